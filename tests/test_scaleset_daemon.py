"""The daemon in scale-set mode, in-process on the toy VM backend, against the fake
scale-set service (real HTTP): capacity decides what is acquired, each acquired job
gets one runner VM, and shutdown leaves neither a session nor an idle runner behind.

The toy backend cannot run GitHub's runner (that is `test_scaleset_e2e`'s job with
real VMs); it holds each runner VM at its restore (the toy's gate) while the test
plays GitHub: the runner takes its job, the job ends, then the VM may end too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runner import compose
from runner.config import Settings, load_settings
from runner.forge.github import scaleset as proto
from runner.forge.github.pending import JIT_ENV
from runner.forge.github.scaleset_source import ScaleSetSource
from runner.service.daemon import Daemon
from runner.service.jobs import Job, JobState
from tests.backends import toy
from tests.backends.toy import ReadyNotifier, toy_settings
from tests.fake_github import FakeGitHub
from tests.fake_scaleset import FakeScaleSetService

ORG = "octo-org"
REPO = "octo-org/hello"
LABELS = ["self-hosted", "linux", "snapfleet"]


@dataclass
class Fake:
    github: FakeGitHub
    service: FakeScaleSetService


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    github = FakeGitHub(prefix="/api/v3")
    await github.start()
    github.add_token("ghs_test_token")
    service = FakeScaleSetService(github)
    service.poll_s = 0.3
    yield Fake(github, service)
    await github.close()
    assert github.violations == [], "REST calls outside GitHub's published schema"
    assert service.violations == [], "scale-set calls of the wrong shape"


def scaleset_settings(tmp_path: Path, fake: Fake, *, host: str, concurrency: int) -> Settings:
    """Toy VMs; one profile serving GitHub jobs through a scale set that would take up to
    five runners (so only the host's capacity holds it back)."""
    (tmp_path / host).mkdir()
    data = toy_settings(tmp_path / host).model_dump()
    data["profiles"]["default"]["labels"] = LABELS
    data["capacity"]["max_concurrency"] = concurrency
    data["github"] = {"mode": "scaleset", "api_url": fake.github.url, "scopes": [ORG],
                      "token": "ghs_test_token", "host": host,
                      "scale_sets": {"default": {"max_runners": 5}}}
    return load_settings(None, **data)


@dataclass
class Host:
    daemon: Daemon
    source: ScaleSetSource
    toy: toy.ToyHypervisor
    ended: list[Job]


@contextlib.asynccontextmanager
async def serving(settings: Settings, service: FakeScaleSetService | None = None
                  ) -> AsyncIterator[Host]:
    notifier = ReadyNotifier()
    daemon = compose.daemon(settings, notifier=notifier)
    source = daemon.sources["github-scaleset"]
    assert isinstance(source, ScaleSetSource)
    hv = daemon.engine.hypervisor
    assert isinstance(hv, toy.ToyHypervisor)
    ended: list[Job] = []

    def heard(job: Job) -> None:
        # Told synchronously as the job ends, before anything else runs: the next
        # runner's VM will wait at its restore until the test lets it through.
        ended.append(job)
        hv.gate.clear()

    daemon.subscribe(heard)
    hv.gate.clear()
    serve = asyncio.create_task(daemon.serve())
    ready = asyncio.create_task(notifier.is_ready.wait())
    await asyncio.wait([serve, ready], return_when=asyncio.FIRST_COMPLETED)
    if serve.done():
        serve.result()
    try:
        yield Host(daemon, source, hv, ended)
    finally:
        daemon.stop()
        hv.gate.set()
        if service is not None:
            service.stop_holding_jit()  # a test that failed may have left one held
        await asyncio.wait_for(serve, 30)


async def until(predicate: Callable[[], object], timeout: float = 15, what: str = "condition"
                ) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def count(items: Any, n: int) -> Callable[[], bool]:
    return lambda: len(items) == n


def acquired(service: FakeScaleSetService) -> list[int]:
    return [rid for rid, owner in service.acquired_by().items() if owner is not None]


async def test_acquires_only_what_the_daemon_can_run_and_runs_each_in_a_vm(
    tmp_path: Path, fake: Fake
) -> None:
    service = fake.service
    settings = scaleset_settings(tmp_path, fake, host="h1", concurrency=1)
    async with serving(settings) as host:
        listener = host.source.listeners[0]
        assert listener.config.scale_set_name == "snapfleet-h1-default"
        await until(lambda: service.sessions, what="a message session")
        jobs = [service.add_job(REPO, ["self-hosted", "linux"]) for _ in range(3)]
        for n in range(1, 4):
            await until(count(service.registered, n), what=f"runner {n}")
            name = list(service.registered)[-1]
            await asyncio.sleep(1.0)  # several re-offers: the host is full, it takes none
            assert len(acquired(service)) == n
            assert len(service.registered) == n
            unfinished = [j for j in host.daemon.jobs.values() if j.source == "github-scaleset"]
            assert [j.spec.name for j in unfinished] == [f"github runner {name}"]
            # The JIT config stays off the job's record (spec, stored secret names).
            assert JIT_ENV not in unfinished[0].spec.env
            assert JIT_ENV not in unfinished[0].secret_env
            # Play GitHub: the runner takes the job, the job ends, then its VM ends.
            rid = service.take_job(name)
            await until(lambda: listener.intake.runners.get(name)  # noqa: B023
                        is proto.RunnerState.BUSY, what="JobStarted")
            service.finish_job(rid)
            host.toy.gate.set()
            await until(count(host.ended, n), what=f"runner VM {n} to end")
            # It reached the VM in memory, as the runner command's env (not its argv).
            ran = runner_execs(host)[-1]
            config = service.jit_configs[service.registered[name]]
            assert ran.env[JIT_ENV] == config
            assert config not in (ran.script or "")
            assert config not in " ".join(ran.argv or ())
        assert sorted(acquired(service)) == sorted(jobs)
        won = [rid for _, _, got in service.acquire_calls for rid in got]
        assert sorted(won) == sorted(jobs)  # each acquired once
        assert all(len(asked) <= 1 for _, asked, _ in service.acquire_calls)
        session = next(iter(service.sessions.values()))
        assert max(session.max_capacity) <= 1
        assert host.toy.restores == 3  # one VM per acquired job
        assert all(j.source == "github-scaleset" for j in host.ended)
        assert host.source.health.failures_total["default"] == 0  # each runner took its job
        status = host.daemon.status()["github"]["scale_sets"]["snapfleet-h1-default"]
        assert status["acquired_total"] == 3
        assert status["session"] is True
    assert service.sessions == {}
    assert len(service.sessions_deleted) == 1


async def test_shutdown_deletes_the_session_and_the_runner_that_took_no_job(
    tmp_path: Path, fake: Fake
) -> None:
    service = fake.service
    settings = scaleset_settings(tmp_path, fake, host="h1", concurrency=2)
    async with serving(settings) as host:
        await until(lambda: service.sessions, what="a message session")
        service.add_job(REPO, ["linux"])
        await until(lambda: service.runners, what="a runner")
        (job,) = [j for j in host.daemon.jobs.values() if j.source == "github-scaleset"]
        await until(lambda: host.toy.live, what="its VM restoring")
        session_id = next(iter(service.sessions.values())).id
        host.daemon.stop()
        await until(lambda: not service.sessions, 5, "the session deleted at once")
        await until(lambda: not service.runners, 5, "the idle runner deregistered")
        service.add_job(REPO, ["linux"])  # offered during the drain: not taken
        await asyncio.sleep(1.0)
    assert service.sessions_deleted == [session_id]
    assert service.runners == {}
    assert len(service.registered) == 1
    assert len(acquired(service)) == 1
    record = await _stored(settings, job.id)
    assert record == JobState.CANCELLED


async def test_a_job_of_another_source_holds_the_slot(tmp_path: Path, fake: Fake) -> None:
    """Capacity is the host's, not the source's: a local job keeps GitHub's out."""
    from runner.service.jobs import JobSpec

    service = fake.service
    settings = scaleset_settings(tmp_path, fake, host="h1", concurrency=1)
    async with serving(settings) as host:
        host.toy.gate.set()
        local = await host.daemon.submit(JobSpec(script="sleep 1.5"), source="local")
        await until(lambda: local.id in host.daemon.tasks, what="the local job running")
        await until(lambda: service.sessions, what="a message session")
        service.add_job(REPO, ["linux"])
        await asyncio.sleep(1.0)
        assert acquired(service) == []
        assert host.daemon.free_slots("default") == 0
        await until(lambda: acquired(service), 10, "the job acquired once the slot freed")
        assert any(j.id == local.id for j in host.ended)


async def test_a_runner_whose_vm_ends_without_a_job_is_deregistered_and_backs_off(
    tmp_path: Path, fake: Fake
) -> None:
    service = fake.service
    settings = scaleset_settings(tmp_path, fake, host="h1", concurrency=2)
    async with serving(settings) as host:
        await until(lambda: service.sessions, what="a message session")
        service.add_job(REPO, ["linux"])
        await until(lambda: service.runners, what="a runner")
        host.toy.gate.set()  # the toy cannot run GitHub's runner: it exits with no job
        await until(lambda: host.ended, what="the runner VM to end")
        await until(lambda: not service.runners, 5, "its registration removed")
        assert host.source.health.failures_total["default"] == 1
        # The job is still GitHub's to run here: a new runner, after the backoff pause.
        assert host.source.health.wait_s("default") > 0
        assert len(service.registered) == 1


async def _stored(settings: Settings, job_id: str) -> Any:
    from runner.service.store import Store

    store = Store(settings.paths.state_dir / "snapfleet.db")
    await store.open()
    try:
        job = await store.get(job_id)
        assert job is not None
        return job.state
    finally:
        await store.close()


# -- the VM restores while GitHub registers its runner (issue 13: overlap) -------------

JIT_PATH = r"_apis/runtime/runnerscalesets/\d+/generatejitconfig"


def runner_jobs(host: Host) -> list[Job]:
    """The runner VMs' daemon jobs that have not ended."""
    return [j for j in host.daemon.jobs.values() if j.source == "github-scaleset"]


def runner_execs(host: Host) -> list[Any]:
    """Commands run in runner VMs (not the snapshot's warm-up)."""
    return [c for c in host.toy.execs if JIT_ENV in c.env]


def ended(host: Host, job: Job) -> bool:
    return any(j.id == job.id for j in host.ended)


@contextlib.asynccontextmanager
async def registration_held(tmp_path: Path, fake: Fake) -> AsyncIterator[tuple[Host, Job, str]]:
    """A daemon (one runner slot) offered a job whose runner's registration the fake holds;
    yields the host, the runner VM's job and the VM, both made before GitHub answered."""
    service = fake.service
    service.hold_jit = True
    settings = scaleset_settings(tmp_path, fake, host="h1", concurrency=1)
    async with serving(settings, service) as host:
        await until(lambda: service.sessions, what="a message session")
        service.add_job(REPO, ["linux"])
        await until(lambda: service.jit_waiting == 1, what="the JIT request")
        (job,) = runner_jobs(host)
        await until(lambda: host.toy.live, what="its VM restoring")
        (vm_id,) = host.toy.live
        assert service.registered == {}  # GitHub has not answered yet
        yield host, job, vm_id


async def test_the_vm_restores_while_github_registers_its_runner(
    tmp_path: Path, fake: Fake
) -> None:
    service = fake.service
    async with registration_held(tmp_path, fake) as (host, job, _vm):
        host.toy.gate.set()  # the restore ends first: the VM waits for its config
        await until(lambda: host.toy.restores == 1, what="the VM restored")
        await until(lambda: job.state is JobState.RUNNING, what="the job running")
        await asyncio.sleep(0.3)
        assert runner_execs(host) == []  # no runner without its config
        service.release_jit()
        await until(lambda: runner_execs(host), what="the runner started")
        (name,) = service.registered
        assert job.spec.name == f"github runner {name}"
        assert runner_execs(host)[0].env[JIT_ENV] == service.jit_configs[service.registered[name]]


async def test_a_refused_registration_cancels_the_vm_and_registers_nothing(
    tmp_path: Path, fake: Fake
) -> None:
    service = fake.service
    async with registration_held(tmp_path, fake) as (host, job, vm_id):
        listener = host.source.listeners[0]
        service.inject("POST", JIT_PATH, 409)  # the held request is refused
        service.release_jit()
        await until(lambda: ended(host, job), what="the VM's job to end")
        assert job.state is JobState.CANCELLED
        assert vm_id in host.toy.destroyed
        assert vm_id not in host.toy.live
        assert service.registered == {}
        assert service.runners == {}
        history = await host.daemon.history(job.id)
        assert any("runner not registered" in (note or "") for _, _, note in history), history
        # A refusal is no runner failure: the job is still ours and is tried again at once.
        assert host.source.health.failures_total["default"] == 0
        await until(lambda: service.jit_waiting == 1, what="a second try")
        (retry,) = runner_jobs(host)
        assert retry.id != job.id
        service.release_jit()
        await until(lambda: service.registered, what="the runner registered")
        await asyncio.sleep(0.5)
        assert len(service.registered) == 1  # nothing registered twice
        assert list(listener.intake.runners) == list(service.registered)
        assert len(acquired(service)) == 1


async def test_a_vm_that_fails_to_restore_before_github_answers_leaves_no_runner(
    tmp_path: Path, fake: Fake
) -> None:
    service = fake.service
    async with registration_held(tmp_path, fake) as (host, job, _vm):
        listener = host.source.listeners[0]
        host.toy.fail_restore = 1
        host.toy.gate.set()
        await until(lambda: ended(host, job), what="the failed restore")
        assert job.state is JobState.SYSTEM_FAILURE
        service.release_jit()  # GitHub registers the runner after all
        await until(lambda: service.registered, what="the late registration")
        await until(lambda: not service.runners, 5, "the registration removed")
        assert listener.intake.runners == {}
        assert host.source.health.failures_total["default"] == 1
        assert host.source.health.wait_s("default") > 0  # backing off, not retrying at once
        await asyncio.sleep(0.5)
        assert len(service.registered) == 1
        assert runner_execs(host) == []


async def test_a_vm_that_fails_to_restore_after_registration_leaves_no_runner(
    tmp_path: Path, fake: Fake
) -> None:
    service = fake.service
    settings = scaleset_settings(tmp_path, fake, host="h1", concurrency=1)
    async with serving(settings) as host:
        await until(lambda: service.sessions, what="a message session")
        service.add_job(REPO, ["linux"])
        await until(lambda: service.runners, what="the runner registered")
        (job,) = runner_jobs(host)
        host.toy.fail_restore = 1
        host.toy.gate.set()
        await until(lambda: ended(host, job), what="the failed restore")
        await until(lambda: not service.runners, 5, "the registration removed")
        assert host.source.health.failures_total["default"] == 1
        assert len(service.registered) == 1


async def test_shutdown_while_github_registers_undoes_the_vm_and_the_runner(
    tmp_path: Path, fake: Fake
) -> None:
    service = fake.service
    async with registration_held(tmp_path, fake) as (host, job, vm_id):
        host.daemon.stop()
        await asyncio.sleep(0.1)
        service.release_jit()
        await until(lambda: ended(host, job), 5, "the VM's job to end")
        await until(lambda: not service.runners, 5, "the runner deregistered")
        await until(lambda: not service.sessions, 5, "the session deleted")
        assert job.state is JobState.CANCELLED
        assert vm_id in host.toy.destroyed
    assert len(service.registered) == 1
    assert service.runners == {}
    assert host.toy.live == {}
