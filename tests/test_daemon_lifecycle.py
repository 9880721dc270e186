"""The daemon's job and lease bookkeeping, in-process, on the toy VM backend.

The daemon is built by the composition root exactly as `snapfleet serve`
builds it; only ``vm.backend`` differs. Tests wait on events, never sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner import compose
from runner.api.client import ApiClient
from runner.config import Settings
from runner.errors import VMError
from runner.execution import Command
from runner.service.daemon import Daemon
from runner.service.jobs import Job, JobSpec, JobState, new_job_id
from runner.service.leases import LeaseBook
from runner.service.scheduler import Resources
from runner.service.store import Store
from tests.backends import toy
from tests.backends.toy import ReadyNotifier, toy_settings


@dataclass
class Running:
    daemon: Daemon
    toy: toy.ToyHypervisor
    leases: LeaseBook
    settings: Settings


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Running]:
    notifier = ReadyNotifier()
    daemon = compose.daemon(settings, notifier=notifier)
    serve = asyncio.create_task(daemon.serve())
    ready = asyncio.create_task(notifier.is_ready.wait())
    await asyncio.wait([serve, ready], return_when=asyncio.FIRST_COMPLETED)
    if serve.done():
        serve.result()  # raises what stopped it
    leases = daemon.sources["gitlab"]
    assert isinstance(leases, LeaseBook)
    hv = daemon.engine.hypervisor
    assert isinstance(hv, toy.ToyHypervisor)
    try:
        yield Running(daemon, hv, leases, settings)
    finally:
        hv.gate.set()
        daemon.stop()
        await asyncio.wait_for(serve, 30)


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Running]:
    async with serving(toy_settings(tmp_path, capacity={"max_concurrency": 1})) as running:
        yield running


def ended(daemon: Daemon, job_id: str) -> asyncio.Future[Job]:
    """A future for the moment ``job_id`` ends (resolved by the daemon's job events)."""
    future: asyncio.Future[Job] = asyncio.get_running_loop().create_future()

    def heard(job: Job) -> None:
        if job.id == job_id and not future.done():
            future.set_result(job)

    daemon.subscribe(heard)
    return future


async def test_a_job_runs_on_a_backend_added_as_one_module(fleet: Running) -> None:
    """The toy backend is named only in the config, yet runs a job through the API."""
    async with ApiClient(fleet.settings.daemon.api_socket) as api:
        job = await api.submit({"script": "echo hello from $WHO; exit 3", "env": {"WHO": "toy"}})
        done = ended(fleet.daemon, job["id"])
        await asyncio.wait_for(done, 30)
        record = await api.job(job["id"])
        log = b"".join([chunk async for chunk in api.logs(job["id"])])
    assert record["state"] == "failed"
    assert record["exit_code"] == 3
    assert b"hello from toy\n" in log
    assert fleet.toy.restores == 1
    assert fleet.toy.live == {}


async def test_a_restore_failure_is_a_system_failure_and_returns_capacity(fleet: Running) -> None:
    fleet.toy.fail_restore = 1
    job = await fleet.daemon.submit(JobSpec(script="true"), source="local")
    done = await asyncio.wait_for(ended(fleet.daemon, job.id), 30)
    assert done.state is JobState.SYSTEM_FAILURE
    assert "the toy refused to restore" in str(done.reason)
    assert fleet.daemon.used == Resources()
    assert fleet.toy.live == {}


async def test_cancel_while_restoring_stops_the_job_and_returns_its_capacity(
    fleet: Running
) -> None:
    fleet.toy.gate.clear()  # restores hang until the gate opens
    job = await fleet.daemon.submit(JobSpec(script="true"), source="local")
    done = ended(fleet.daemon, job.id)
    while fleet.toy.live == {}:  # its VM is being made
        await asyncio.sleep(0)
    await fleet.daemon.cancel(job.id)
    finished = await asyncio.wait_for(done, 10)
    assert finished.state is JobState.CANCELLED
    assert fleet.daemon.used == Resources()
    assert fleet.toy.live == {}
    assert len(fleet.toy.destroyed) == 1


async def test_releasing_a_queued_lease_fails_its_waiter(fleet: Running) -> None:
    blocker = await fleet.daemon.submit(JobSpec(script="sleep 1000"), source="local")
    waiter = asyncio.create_task(fleet.leases.acquire("runner-1:job-1", None))
    while "runner-1:job-1" not in fleet.leases.by_key:
        await asyncio.sleep(0)
    lease = fleet.leases.by_key["runner-1:job-1"]
    assert lease.job is not None
    assert lease.job.state is JobState.QUEUED
    assert await fleet.leases.release("runner-1:job-1")
    with pytest.raises(VMError, match="cancelled"):
        await asyncio.wait_for(waiter, 5)
    assert fleet.leases.by_job == {}
    recorded = await fleet.daemon.job(lease.job.id)
    assert recorded is not None
    assert recorded.state is JobState.CANCELLED
    await fleet.daemon.cancel(blocker.id)


async def test_two_prepares_for_one_key_hold_one_vm(fleet: Running) -> None:
    first = asyncio.create_task(fleet.leases.acquire("runner-1:job-9", None))
    second = asyncio.create_task(fleet.leases.acquire("runner-1:job-9", None))
    a, b = await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert a is b
    assert len(fleet.toy.live) == 1
    assert await fleet.leases.release("runner-1:job-9")
    assert fleet.toy.live == {}


async def test_a_failed_build_stage_fails_the_lease_job_and_counts_as_failed(
    fleet: Running
) -> None:
    lease = await fleet.leases.acquire("runner-1:job-5", None)
    assert lease.job is not None
    out: list[bytes] = []
    ok = await fleet.leases.exec("runner-1:job-5", Command(script="echo fetched"),
                                 lambda _s, d: out.append(d), stage="get_sources")
    build = await fleet.leases.exec("runner-1:job-5", Command(script="echo oops >&2; exit 1"),
                                    lambda _s, d: out.append(d), stage="build_script")
    after = await fleet.leases.exec("runner-1:job-5", Command(script="exit 2"),
                                    lambda _s, d: out.append(d), stage="after_script")
    assert (ok.state, build.state, build.exit_code) == (
        JobState.SUCCEEDED, JobState.FAILED, 1)
    assert after.exit_code == 2
    assert b"".join(out) == b"fetched\noops\n"
    done = ended(fleet.daemon, lease.job.id)
    assert await fleet.leases.release("runner-1:job-5")
    job = await asyncio.wait_for(done, 10)
    assert job.state is JobState.FAILED
    assert job.exit_code == 1
    assert job.reason == "stage build_script: failed, exit code 1"
    log = b"".join([c async for c in fleet.daemon.follow_log(job.id, 0, follow=False)])
    assert b"stage build_script: started" in log
    assert b"stage build_script: failed, exit code 1 (5 bytes of output to the driver)" in log
    assert b"oops\n" not in log  # the trace is GitLab's (masked there), not kept here
    metrics = fleet.daemon.metrics.render().decode()
    assert 'snapfleet_jobs_total{outcome="failed"} 1.0' in metrics
    assert 'snapfleet_jobs_total{outcome="succeeded"} 0.0' in metrics


async def test_a_stage_is_bounded_by_the_lease_jobs_timeout(fleet: Running) -> None:
    lease = await fleet.leases.acquire("runner-1:job-6", None, timeout_s=1.5)
    assert lease.job is not None
    done = ended(fleet.daemon, lease.job.id)
    outcome = await asyncio.wait_for(
        fleet.leases.exec("runner-1:job-6", Command(script="sleep 30"), lambda _s, _d: None,
                          stage="build_script"), 20)
    assert outcome.state is JobState.TIMED_OUT
    job = await asyncio.wait_for(done, 20)  # the job's own timeout ended it too
    assert job.state is JobState.TIMED_OUT


async def test_an_internal_failure_still_ends_running_jobs_and_records_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a background task of the daemon crashes, running jobs are cancelled (their VMs
    torn down) and recorded before the store closes: nothing is left orphaned."""
    settings = toy_settings(tmp_path)
    notifier = ReadyNotifier()
    daemon = compose.daemon(settings, notifier=notifier)
    crash = asyncio.Event()

    async def crashing_reconcile_loop() -> None:
        await crash.wait()
        raise RuntimeError("reconcile blew up")

    monkeypatch.setattr(daemon, "_reconcile_loop", crashing_reconcile_loop)
    serving_task = asyncio.create_task(daemon.serve())
    await asyncio.wait_for(notifier.is_ready.wait(), 30)
    job = await daemon.submit(JobSpec(script="echo up; sleep 1000"), source="local")
    while job.state is not JobState.RUNNING:
        await asyncio.sleep(0.01)
    crash.set()
    with pytest.raises(ExceptionGroup) as info:
        await asyncio.wait_for(serving_task, 30)
    assert info.group_contains(RuntimeError, match="reconcile blew up")
    assert daemon.tasks == {}
    assert daemon.engine.hypervisor.live == {}
    store = Store(daemon.store.path)  # the daemon closed its own
    await store.open()
    try:
        recorded = await store.get(job.id)
    finally:
        await store.close()
    assert recorded is not None
    assert recorded.state is JobState.CANCELLED
    assert recorded.reason == "cancelled: the daemon hit an internal error"


async def test_a_queued_job_stored_by_a_laxer_version_fails_clearly_at_restart(
    tmp_path: Path
) -> None:
    """A spec today's checks refuse (here an env key with "=", which older versions
    stored) must not stop the daemon from starting, nor run: it fails with the reason."""
    settings = toy_settings(tmp_path)
    store = Store(settings.paths.state_dir / "snapfleet.db")
    await store.open()
    job = Job(id=new_job_id(), spec=JobSpec(script="true"), profile="default", source="local")
    try:
        await store.add_job(job)
    finally:
        await store.close()
    db = sqlite3.connect(settings.paths.state_dir / "snapfleet.db")
    with db:
        db.execute("UPDATE jobs SET spec=? WHERE id=?",
                   (json.dumps({"script": "true", "env": {"A=B": "x"}}), job.id))
    db.close()
    async with serving(settings) as running:
        recorded = await running.daemon.job(job.id)
        assert recorded is not None
        assert recorded.state is JobState.SYSTEM_FAILURE
        assert str(recorded.reason).startswith("this job was queued by an older version")
        assert "env" in str(recorded.reason)
        assert [j.id for j in await running.daemon.recent_jobs(10)] == [job.id]  # listable
