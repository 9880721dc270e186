"""Config of one runner of the direct GitLab job source (``[[gitlab.runners]]``).

``snapfleet gitlab register`` prints exactly this section. The runner token
itself stays in ``token_file`` (0600, or a systemd credential); the config
never holds a secret.
"""

from __future__ import annotations

import hashlib
import socket
import stat
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from runner.errors import ConfigError
from runner.secret import Secret

Tag = Annotated[str, StringConstraints(pattern=r"^[^,\s][^,]*$")]


class GitLabRunnerConfig(BaseModel):
    """One registered runner: where GitLab is, which token, which tags it serves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: Annotated[str, StringConstraints(pattern=r"^https?://[^/@\s]+(/\S*)?$")]
    """GitLab's URL (no credentials), e.g. ``https://gitlab.example.com``."""
    runner_id: int = Field(gt=0)
    token_file: Path
    """The ``glrt-`` runner token, one line (``snapfleet gitlab register`` writes it)."""
    tags: list[Tag] = Field(default_factory=list)
    """Tags this runner was registered with; map them to profiles to serve them."""
    run_untagged: bool = False
    check_interval_s: float = Field(default=3.0, gt=0)
    """Least time between two job requests when GitLab answers "none" at once."""
    builds_dir: str = "/builds"
    """Where projects are checked out in the guest."""


def read_runner_token(path: Path) -> Secret:
    """The stored runner token; refuses a file others can read."""
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError("runner token", f"cannot read {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError("runner token",
                          f"{path} is readable by others (mode {info.st_mode & 0o777:o});"
                          " chmod 600 it")
    if not text:
        raise ConfigError("runner token", f"{path} is empty")
    return Secret(text)


def default_system_id() -> str:
    """A stable id for this host, in gitlab-runner's ``s_<12 hex>`` form."""
    try:
        seed = Path("/etc/machine-id").read_text().strip()
    except OSError:
        seed = socket.gethostname()
    return "s_" + hashlib.sha256(f"snapfleet:{seed}".encode()).hexdigest()[:12]
