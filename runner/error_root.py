"""The root of the exception tree, and ``ConfigError``, importable without the rest.

`runner.errors` is the tree and re-exports these two (import them from there);
they live here because that module imports the agent protocol (for
``AgentProtocolError``'s base), ~20 ms that the CLI's short-lived clients of
the daemon (`runner.cli.client_cmds`) would pay on every start for nothing.
"""

from __future__ import annotations


class SnapfleetError(Exception):
    """Base of every error Snapfleet raises on purpose."""


class ConfigError(SnapfleetError):
    """Configuration or user input is invalid.

    ``key`` names the offending setting or field (dotted path), ``reason`` says why.
    """

    def __init__(
        self, key: str, reason: str, *, problems: list[tuple[str, str]] | None = None
    ) -> None:
        self.problems = problems or [(key, reason)]
        super().__init__("; ".join(f"{k}: {r}" if k else r for k, r in self.problems))
        self.key = key
        self.reason = reason
