"""Values the GitHub adapter hands out: scopes, runners, jobs, JIT configs, secrets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

from runner.errors import ConfigError
from runner.secret import Secret

FORGE = "github"


@dataclass(frozen=True)
class Scope:
    """Where runners are registered: one repository (``owner/repo``) or one organization."""

    owner: str
    repo: str | None = None

    @classmethod
    def parse(cls, text: str) -> Scope:
        """``"owner/repo"`` → a repository scope; ``"org"`` → an organization scope."""
        parts = text.split("/")
        if len(parts) == 1 and parts[0]:
            return cls(parts[0])
        if len(parts) == 2 and all(parts):
            return cls(parts[0], parts[1])
        raise ConfigError("github.scope", f"expected 'owner/repo' or 'org', got {text!r}")

    @property
    def kind(self) -> Literal["repo", "org"]:
        """``"repo"`` or ``"org"``."""
        return "org" if self.repo is None else "repo"

    @property
    def path(self) -> str:
        """The REST path prefix: ``/repos/{owner}/{repo}`` or ``/orgs/{org}``."""
        if self.repo is None:
            return f"/orgs/{quote(self.owner, safe='')}"
        return f"/repos/{quote(self.owner, safe='')}/{quote(self.repo, safe='')}"

    def __str__(self) -> str:
        return self.owner if self.repo is None else f"{self.owner}/{self.repo}"


@dataclass(frozen=True)
class JitConfig:
    """A just-in-time runner registration: the guest runs ``run.sh --jitconfig <value>``."""

    runner_id: int
    name: str
    encoded_jit_config: Secret


Register = Callable[[], Awaitable[JitConfig]]
"""Ask GitHub for a runner's JIT config (which registers the runner)."""


@dataclass(frozen=True)
class Runner:
    """A self-hosted runner registration as GitHub reports it."""

    id: int
    name: str
    status: str
    """``online`` or ``offline``."""
    busy: bool
    labels: tuple[str, ...]


@dataclass(frozen=True)
class QueuedJob:
    """A workflow job waiting for a runner."""

    id: int
    run_id: int
    labels: tuple[str, ...]
    repo: str
    """``owner/repo``."""
