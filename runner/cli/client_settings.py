"""The few settings a client of the daemon needs, read without the full model.

`snapfleet submit` and the GitLab executor's stages need the API socket (and
the stages gitlab's directories and the default profile name), not the whole
configuration: validating it all with pydantic costs them ~300 ms of imports
per process. These keys are read from the same sources with the same
precedence as `runner.config.load_settings` (``SNAPFLEET_*`` environment, then
the TOML file, then defaults) and refused with the same messages. Anything
this reader does not mirror exactly (a JSON-valued ``SNAPFLEET_DAEMON``,
credentials files, profiles from the environment) goes to the full loader.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import NamedTuple

from runner.error_root import ConfigError

_ENV_PREFIX = "snapfleet_"


class ClientSettings(NamedTuple):
    """`daemon.api_socket`, `gitlab.builds_dir`, `gitlab.cache_dir`, `default_profile`."""

    api_socket: Path = Path("/run/snapfleet/api.sock")
    builds_dir: str = "/builds"
    cache_dir: str = "/cache"
    default_profile: str = "default"


# field → (section, key, kind) as in `runner.config.Settings`
_KEYS = {
    "api_socket": ("daemon", "api_socket", "DaemonSettings"),
    "builds_dir": ("gitlab", "builds_dir", "GitLabSettings"),
    "cache_dir": ("gitlab", "cache_dir", "GitLabSettings"),
    "default_profile": (None, "default_profile", ""),
}


def load(path: Path | None) -> ClientSettings:
    """The client's settings; ConfigError naming each bad key, as the full loader would."""
    env = {k.lower(): v for k, v in os.environ.items() if k.lower().startswith(_ENV_PREFIX)}
    if os.environ.get("CREDENTIALS_DIRECTORY") or any(
        k in ("snapfleet_daemon", "snapfleet_gitlab") or k.startswith("snapfleet_profiles")
        for k in env
    ):
        return _full(path)
    doc = _read(path) if path is not None else {}
    values: dict[str, str] = {}
    problems: dict[tuple[str, str], None] = {}  # ordered, and a bad [gitlab] counts once

    def refuse(key: str, reason: str) -> None:
        problems[(key, reason)] = None

    for field, (section, key, model) in _KEYS.items():
        env_name = _ENV_PREFIX + (f"{section}__{key}" if section else key)
        table = doc.get(section, {}) if section else doc
        if env_name in env:
            value: object = env[env_name]
        elif not isinstance(table, dict):
            refuse(str(section), f"Input should be a valid dictionary or instance of {model}")
            continue
        elif key in table:
            value = table[key]
        else:
            continue
        if isinstance(value, str):
            values[field] = value
        elif field == "api_socket":
            refuse(f"{section}.{key}", "Input is not a valid path for <class 'pathlib.Path'>")
        else:
            refuse(f"{section}.{key}" if section else key, "Input should be a valid string")
    default = values.get("default_profile", "default")
    profiles = doc.get("profiles", {"default": None})
    if not problems and isinstance(profiles, dict) and default not in profiles:
        refuse("(top level)", f"Value error, default_profile {default!r} is not in [profiles]")
    if problems:
        listed = list(problems)
        raise ConfigError(listed[0][0], listed[0][1], problems=listed)
    defaults = ClientSettings()
    return ClientSettings(
        api_socket=Path(values["api_socket"]) if "api_socket" in values else defaults.api_socket,
        builds_dir=values.get("builds_dir", defaults.builds_dir),
        cache_dir=values.get("cache_dir", defaults.cache_dir),
        default_profile=default,
    )


def _read(path: Path) -> dict[str, object]:
    # The same messages as runner.config._check_toml.
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("", f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc}") from None


def _full(path: Path | None) -> ClientSettings:
    from runner.config import load_settings

    settings = load_settings(path)
    return ClientSettings(settings.daemon.api_socket, settings.gitlab.builds_dir,
                          settings.gitlab.cache_dir, settings.default_profile)
