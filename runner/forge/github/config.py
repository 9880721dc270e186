"""The GitHub section of the configuration, validated once at start."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from runner.errors import ConfigError
from runner.forge.github.types import Scope

SCALE_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ScaleSetConfig(BaseModel):
    """One profile's runner scale set (``[github.scale_sets.<profile>]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    """The scale set's name; default ``<runner_name_prefix>-<host>-<profile>``. Each host
    needs its own: a scale set takes one message session at a time."""
    max_runners: Annotated[int, Field(ge=1, le=1000)] | None = None
    """Runners of this scale set at once; default: ``capacity.max_concurrency``."""

    @model_validator(mode="after")
    def _valid_name(self) -> ScaleSetConfig:
        if self.name is not None and not SCALE_SET_NAME.match(self.name):
            raise ValueError(f"scale set name {self.name!r}: use letters, digits, '.', '_', '-'")
        return self


class GitHubConfig(BaseModel):
    """How Snapfleet talks to GitHub. Exactly one of ``token`` or the App trio is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["webhook", "scaleset"] = "webhook"
    """How jobs reach this host: ``webhook`` (GitHub posts ``workflow_job`` to us, a
    reconcile loop backs it) or ``scaleset`` (we long-poll GitHub's runner scale-set
    queue: no inbound port, and several hosts share the work)."""
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
    """Webhook mode: runner group id for JIT runners (1 = the default group)."""
    runner_group: Annotated[str, Field(min_length=1)] = "default"
    """Scale-set mode: the runner group (by name) the scale sets belong to."""
    scale_sets: dict[str, ScaleSetConfig] = Field(default_factory=dict)
    """Scale-set mode: per profile, its scale set. Unset: every profile with labels
    gets one, named ``<runner_name_prefix>-<host>-<profile>``; set: only those listed."""
    runner_name_prefix: str = "snapfleet"
    """Runner names are ``<prefix>-<host>-<suffix>``; reconcile only touches these."""
    idle_limit_s: Annotated[float, Field(gt=0)] = 600.0
    """A runner that took no job in this long is deregistered and its VM destroyed."""
    request_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    """Tries per request (5xx, connection errors, rate limits)."""
    max_wait_s: Annotated[float, Field(ge=0)] = 120.0
    """Total time one request may spend waiting between tries."""
    webhook_url: str | None = None
    """The public URL GitHub delivers webhooks to (your TLS proxy's); only `snapfleet
    github check` reads it, to find the webhook."""
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
        self._settings_fit_the_mode()
        return self

    def _settings_fit_the_mode(self) -> None:
        if self.mode == "webhook":
            if self.scale_sets or self.runner_group != "default":
                raise ValueError("scale_sets and runner_group are for mode = \"scaleset\";"
                                 " webhook mode uses runner_group_id")
            return
        if self.webhook_secret is not None or self.poll_repos or self.webhook_url:
            raise ValueError("webhook_secret, webhook_url and poll_repos are for mode ="
                             " \"webhook\";"
                             " scale-set mode needs no webhook (remove them)")
        if self.runner_group_id != 1:
            raise ValueError("scale-set mode names its runner group: set runner_group"
                             " (a name), not runner_group_id")

    def scale_set_profiles(self, labels: Mapping[str, Sequence[str]]) -> list[str]:
        """Scale-set mode: the profiles that get a scale set, given each profile's labels."""
        if self.scale_sets:
            return list(self.scale_sets)
        return [profile for profile, served in labels.items() if served]

    def scale_set_name(self, profile: str, host: str) -> str:
        """The scale set of ``profile`` on ``host``: configured, or per host by default."""
        configured = self.scale_sets.get(profile)
        if configured is not None and configured.name is not None:
            return configured.name
        return f"{self.runner_name_prefix}-{host}-{profile}"

    def check_profiles(self, labels: Mapping[str, Sequence[str]]) -> None:
        """Scale-set mode: ``scale_sets`` names known profiles with labels, and some
        profile serves GitHub. ``ValueError`` says which and how to fix it."""
        if self.mode != "scaleset":
            return
        unknown = sorted(set(self.scale_sets) - set(labels))
        if unknown:
            raise ValueError(f"github.scale_sets names unknown profiles: {unknown}")
        bare = sorted(p for p in self.scale_sets if not labels[p])
        if bare:
            raise ValueError(f"github.scale_sets: profiles {bare} have no labels; a scale set"
                             " routes jobs by the profile's labels (add `labels = [...]`)")
        names = [s.name for s in self.scale_sets.values() if s.name is not None]
        if len(names) != len(set(names)):
            raise ValueError("github.scale_sets: two profiles name the same scale set")
        if not self.scale_set_profiles(labels):
            raise ValueError("github mode = \"scaleset\" but no profile has labels: give the"
                             " profiles that run GitHub jobs `labels = [\"self-hosted\", ...]`")

    def repos_to_poll(self) -> list[Scope]:
        """``poll_repos``, or the repository scopes when it is empty."""
        names = self.poll_repos or [s for s in self.scopes if "/" in s]
        return [Scope.parse(n) for n in names]
