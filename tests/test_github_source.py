"""The GitHub source's reconcile pass against a stub client (no server, no VMs)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from runner.errors import ForgeError
from runner.forge.github.config import GitHubConfig
from runner.forge.github.source import GitHubSource
from runner.forge.github.types import Runner, Scope


class StubClient:
    """Lists an orphaned registration in every scope; one scope and one repo always fail."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.deleted: list[tuple[str, int]] = []

    async def queued_jobs(self, repo: Scope) -> list[Any]:
        if repo.owner == "broken":
            raise ForgeError("Not Found", forge="github", status=404)
        return []

    async def list_runners(self, scope: Scope) -> list[Runner]:
        if scope.owner == "broken":
            raise ForgeError("Forbidden", forge="github", status=403)
        return [Runner(7, f"{self.prefix}gone", "offline", False, ("self-hosted",))]

    async def delete_runner(self, scope: Scope, runner_id: int) -> None:
        self.deleted.append((str(scope), runner_id))


async def test_one_failing_scope_or_repo_does_not_hold_up_the_others() -> None:
    config = GitHubConfig.model_validate(
        {"scopes": ["broken/repo", "good/repo"], "token": "t", "host": "h1"}
    )
    daemon: Any = SimpleNamespace(subscribe=lambda _l: None, unfinished=lambda _j: None,
                                  settings=None)
    source = GitHubSource(config, daemon, None)
    client = StubClient(source.prefix)
    source.client = client  # type: ignore[assignment]
    with pytest.raises(ForgeError, match="github"):
        await source.reconcile_once(poll=True)
    # The good scope was still reconciled: its orphaned registration is gone.
    assert client.deleted == [("good/repo", 7)]
