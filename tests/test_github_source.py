"""The GitHub source's reconcile pass against a stub client (no server, no VMs)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from runner.config import load_settings
from runner.errors import ForgeError
from runner.forge.github.api import GitHubClient
from runner.forge.github.config import GitHubConfig
from runner.forge.github.health import BackoffPolicy, ProfileHealth
from runner.forge.github.source import GitHubSource
from runner.forge.github.types import Runner, Scope
from runner.forge.github.webhook import WorkflowJobEvent
from runner.service.jobs import TERMINAL, Job, JobSpec, JobState, new_job_id
from tests.fake_github import FakeGitHub


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


# -- lifecycle, against the fake GitHub (a real server) and a stand-in daemon ------------

REPO = "octo-org/hello"
LABELS = ["self-hosted", "linux", "snapfleet"]


class StandInDaemon:
    """The part of the daemon (`JobPort`) the GitHub source uses; VMs are not booted."""

    def __init__(self, state_dir: Path) -> None:
        self.settings = load_settings(
            None, paths={"state_dir": state_dir, "cache_dir": state_dir / "cache"},
            profiles={"default": {}, "gh": {"labels": LABELS}},
        )
        self.stopping = asyncio.Event()
        self.jobs: dict[str, Job] = {}
        self.cancelled: list[str] = []
        self._listeners: list[Callable[[Job], None]] = []

    async def submit(self, spec: JobSpec, *, source: str, secret_env: Any = None,
                     work: Any = None) -> Job:
        job = Job(id=new_job_id(), spec=spec, profile=spec.profile or "default", source=source)
        self.jobs[job.id] = job
        return job

    async def cancel(self, job_id: str) -> Job:
        self.cancelled.append(job_id)
        return self.end(job_id, JobState.CANCELLED)

    async def annotate(self, job_id: str, note: str) -> None:
        return None

    def subscribe(self, listener: Callable[[Job], None]) -> None:
        self._listeners.append(listener)

    def unfinished(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        return job if job is not None and job.state not in TERMINAL else None

    def end(self, job_id: str, state: JobState = JobState.SUCCEEDED) -> Job:
        job = self.jobs[job_id]
        job.state = state
        for listener in self._listeners:
            listener(job)
        return job


@pytest.fixture
async def fake() -> AsyncIterator[FakeGitHub]:
    server = FakeGitHub(prefix="/api/v3")
    await server.start()
    server.add_token("ghs_test_token")
    yield server
    await server.close()
    assert server.violations == []


def make_source(fake: FakeGitHub, tmp_path: Path, **extra: Any
                ) -> tuple[GitHubSource, StandInDaemon]:
    config = GitHubConfig.model_validate({
        "api_url": fake.url, "scopes": [REPO, "octo-org"], "token": "ghs_test_token",
        "host": "h1", "reconcile_interval_s": 0.2, **extra,
    })
    daemon = StandInDaemon(tmp_path)
    return GitHubSource(config, daemon), daemon  # type: ignore[arg-type]


def queued(job_id: int, repo: str = REPO, action: str = "queued",
           runner: str | None = None) -> WorkflowJobEvent:
    return WorkflowJobEvent(
        delivery_id=f"d-{job_id}-{action}", action=action,  # type: ignore[arg-type]
        job_id=job_id, run_id=1, repo=repo, owner=repo.split("/")[0], labels=tuple(LABELS),
        runner_name=runner, runner_id=None, conclusion=None, html_url=None,
        installation_id=None,
    )


def registrations(fake: FakeGitHub) -> int:
    return len(fake.jit_configs)


async def until(predicate: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_no_registration_once_shutdown_begins(fake: FakeGitHub, tmp_path: Path) -> None:
    source, daemon = make_source(fake, tmp_path)
    async with source.open():
        daemon.stopping.set()  # SIGTERM: the daemon starts draining its running jobs
        await asyncio.sleep(0.05)
        source.on_event(queued(fake.add_job(REPO, LABELS)[1]))  # a delivery during the drain
        await asyncio.sleep(0.6)  # several reconcile intervals
        assert registrations(fake) == 0
        await source.start_runner(Scope.parse(REPO), "gh")  # even asked directly
        assert registrations(fake) == 0


async def test_unused_registrations_are_deleted_at_shutdown_and_at_start(
    fake: FakeGitHub, tmp_path: Path
) -> None:
    left_over = fake.add_runner(REPO, "snapfleet-h1-dead0001", status="online")
    theirs = fake.add_runner(REPO, "someone-else", status="offline")
    source, daemon = make_source(fake, tmp_path)
    async with source.open():
        assert left_over not in fake.runners[REPO]  # a crashed run's, deleted at start
        assert theirs in fake.runners[REPO]
        first, second = fake.add_job(REPO, LABELS)[1], fake.add_job(REPO, LABELS)[1]
        source.on_event(queued(first))
        source.on_event(queued(second))
        await until(lambda: registrations(fake) == 2)
        busy_name = next(r.name for r in source.runners.values())
        source.on_event(queued(first, action="in_progress", runner=busy_name))
        fake.runners[REPO][source.runners[busy_name].runner_id or 0]["busy"] = True
        started = time.monotonic()
        daemon.stopping.set()
        await until(lambda: len(fake.runners[REPO]) == 2)  # theirs and the busy one
    assert time.monotonic() - started < 5
    names = {r["name"] for r in fake.runners[REPO].values()}
    assert names == {"someone-else", busy_name}  # the idle runner of ours is gone
    idle_job = next(j for j in daemon.jobs.values() if j.id in daemon.cancelled)
    assert idle_job.state is JobState.CANCELLED  # and its VM was not left to idle


async def test_a_runner_that_takes_no_job_backs_its_profile_off(
    fake: FakeGitHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source, daemon = make_source(fake, tmp_path)
    source.health = ProfileHealth(BackoffPolicy(base_s=30, cap_s=300, unhealthy_after=2))
    async with source.open():
        source.on_event(queued(fake.add_job(REPO, LABELS)[1]))
        await until(lambda: registrations(fake) == 1)
        job = next(iter(daemon.jobs.values()))
        daemon.end(job.id, JobState.FAILED)  # the runner exited; GitHub saw no job start
        await asyncio.sleep(1.0)  # five reconcile intervals
        assert registrations(fake) == 1  # no hot loop against the registration endpoint
        assert source.health.failures_total["gh"] == 1
        assert source.health.wait_s("gh") > 20
        assert source.unhealthy_profiles() == {}
        source.health = ProfileHealth(BackoffPolicy(base_s=0.01, unhealthy_after=2))
        source.health.failed("gh")
        await until(lambda: registrations(fake) == 2)  # after the pause, one more try
        second = next(j for j in daemon.jobs.values() if j.id != job.id)
        daemon.end(second.id, JobState.FAILED)
        await until(lambda: "gh" in source.unhealthy_profiles())
        assert "ended without a job" in source.status()["github"]["unhealthy_profiles"]["gh"]


async def test_queued_jobs_survive_a_restart_and_are_checked_against_the_api(
    fake: FakeGitHub, tmp_path: Path
) -> None:
    _run, org_job = fake.add_job("octo-org/other", LABELS)  # a repository nobody polls
    _run, done = fake.add_job("octo-org/done", LABELS, job_status="completed")
    source, daemon = make_source(fake, tmp_path)
    async with source.open():
        daemon.stopping.set()  # heard during a shutdown: nothing is started for it
        source.on_event(queued(org_job, repo="octo-org/other"))
        source.on_event(queued(done, repo="octo-org/done"))
    assert registrations(fake) == 0
    # The next daemon remembers both; the API says one is gone, the other still queued.
    again, _ = make_source(fake, tmp_path)
    async with again.open():
        await until(lambda: registrations(fake) == 1)
        assert set(again.queued) == {org_job}
        assert done in again.finished


async def test_queued_after_completed_is_not_served(fake: FakeGitHub, tmp_path: Path) -> None:
    source, _ = make_source(fake, tmp_path)
    async with source.open():
        job_id = fake.add_job(REPO, LABELS)[1]  # still listed as queued (the API lags)
        source.on_event(queued(job_id, action="completed"))
        source.on_event(queued(job_id))  # delivered late
        await asyncio.sleep(0.6)
        assert source.queued == {}
        assert registrations(fake) == 0


async def test_a_fresh_webhook_job_the_api_says_started_gets_no_runner(
    fake: FakeGitHub, tmp_path: Path
) -> None:
    run_id, job_id = fake.add_job(REPO, LABELS, job_status="in_progress")
    source, daemon = make_source(fake, tmp_path)
    daemon.stopping.set()
    async with source.open():  # only the state file and cleanup; the loop exits at once
        pass
    source2, _ = make_source(fake, tmp_path)
    source2.on_event(queued(job_id))  # heard just now, but it already started
    source2.client = GitHubClient.from_config(source2.config)
    try:
        await source2.reconcile_once(poll=True)
    finally:
        await source2.client.close()
    assert source2.queued == {}
    assert registrations(fake) == 0
    assert run_id in fake.jobs


async def test_the_vm_is_queued_before_the_runner_is_registered_and_a_failed_registration_cancels_it(  # noqa: E501
    fake: FakeGitHub, tmp_path: Path
) -> None:
    """JIT config and restore overlap: the runner VM's job is queued first, so its VM
    restores while GitHub answers; if GitHub refuses, the VM's job is cancelled."""
    source, daemon = make_source(fake, tmp_path)
    fake.inject("POST", f"/repos/{REPO}/actions/runners/generate-jitconfig", 403)
    async with source.open():
        with pytest.raises(ForgeError):
            await source.start_runner(Scope.parse(REPO), "gh")
        assert len(daemon.jobs) == 1  # queued before GitHub was asked
        assert daemon.cancelled == list(daemon.jobs)  # and cancelled when GitHub said no
        assert source.runners == {}
        await source.start_runner(Scope.parse(REPO), "gh")
        assert registrations(fake) == 1
        assert len(daemon.jobs) == 2
        assert len(daemon.cancelled) == 1


async def test_a_vm_that_ends_while_its_runner_registers_leaves_no_registration(
    fake: FakeGitHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VM's restore fails before GitHub answers: the runner GitHub registered anyway
    is removed at once (nothing will ever run it) and the profile backs off."""
    source, daemon = make_source(fake, tmp_path)
    async with source.open():
        register = source.client.generate_jitconfig

        async def slow_github(*args: Any, **kwargs: Any) -> Any:
            (job,) = daemon.jobs.values()  # queued before GitHub was asked
            daemon.end(job.id, JobState.SYSTEM_FAILURE)  # its restore failed meanwhile
            return await register(*args, **kwargs)

        monkeypatch.setattr(source.client, "generate_jitconfig", slow_github)
        await source.start_runner(Scope.parse(REPO), "gh")
        assert registrations(fake) == 1
        assert fake.runners.get(REPO, {}) == {}  # removed again, not left for reconcile
        assert source.runners == {}
        assert source.health.failures_total["gh"] == 1
        assert daemon.cancelled == []
