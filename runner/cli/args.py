"""Option parsing shared by commands (kept free of heavy imports: `submit` uses it)."""

from __future__ import annotations

import os

from runner.error_root import ConfigError


def parse_env(pairs: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """`--env` options as (plain, secret): `K=V` is plain; `K` alone passes the caller's
    own value of K, which is secret (it stays out of the process list, and the daemon
    keeps it in memory only)."""
    plain: dict[str, str] = {}
    secret: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not key or not key.replace("_", "").isalnum():
            raise ConfigError("--env", f"expected K=V or K, got {pair!r}")
        if sep:
            plain[key] = value
            secret.pop(key, None)
        elif key not in os.environ:
            raise ConfigError("--env", f"{key} is not set in this environment")
        else:
            secret[key] = os.environ[key]
            plain.pop(key, None)
    return plain, secret
