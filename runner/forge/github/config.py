"""The GitHub section of the configuration, validated once at start."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from runner.errors import ConfigError
from runner.forge.github.types import Scope


class GitHubConfig(BaseModel):
    """How Snapfleet talks to GitHub. Exactly one of ``token`` or the App trio is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_url: str = "https://api.github.com"
    """REST base URL; GitHub Enterprise Server: ``https://HOST/api/v3``."""
    scopes: Annotated[list[str], Field(min_length=1)]
    """Where runners register: ``owner/repo`` or ``org`` entries."""
    poll_repos: list[str] = Field(default_factory=list)
    """Repositories whose queued jobs the reconcile loop polls; default: the repo scopes."""
    token: SecretStr | None = None
    """A personal access token (fine-grained: Administration write on the repos)."""
    app_id: int | None = None
    installation_id: int | None = None
    private_key_path: Path | None = None
    """The GitHub App's PEM private key."""
    webhook_secret: SecretStr | None = None
    """Checks ``X-Hub-Signature-256``; unset = no webhook endpoint, polling only."""
    runner_group_id: Annotated[int, Field(ge=1)] = 1
    """Runner group for JIT runners (1 = the default group)."""
    runner_name_prefix: str = "snapfleet"
    """Runner names are ``<prefix>-<host>-<suffix>``; reconcile only touches these."""
    idle_limit_s: Annotated[float, Field(gt=0)] = 600.0
    """A runner that took no job in this long is deregistered and its VM destroyed."""
    request_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    """Tries per request (5xx, connection errors, rate limits)."""
    max_wait_s: Annotated[float, Field(ge=0)] = 120.0
    """Total time one request may spend waiting between tries."""
    webhook_listen: str = "127.0.0.1:8089"
    """Where `POST /webhooks/github` is served (`host:port`); put a TLS proxy in front."""
    reconcile_interval_s: Annotated[float, Field(gt=0)] = 30.0
    """How often queued jobs, runners and VMs are compared (webhooks get lost)."""
    host: str | None = None
    """Host part of runner names (default: this machine's hostname)."""

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> GitHubConfig:
        app = [self.app_id, self.installation_id, self.private_key_path]
        if any(v is not None for v in app) and not all(v is not None for v in app):
            raise ValueError("app_id, installation_id and private_key_path go together")
        if (self.token is None) == (self.app_id is None):
            raise ValueError("set either token or app_id/installation_id/private_key_path")
        for text in [*self.scopes, *self.poll_repos]:
            try:
                Scope.parse(text)
            except ConfigError as exc:
                raise ValueError(exc.reason) from exc
        if any(Scope.parse(r).kind != "repo" for r in self.poll_repos):
            raise ValueError("poll_repos entries must be 'owner/repo'")
        return self

    def repos_to_poll(self) -> list[Scope]:
        """``poll_repos``, or the repository scopes when it is empty."""
        names = self.poll_repos or [s for s in self.scopes if "/" in s]
        return [Scope.parse(n) for n in names]
