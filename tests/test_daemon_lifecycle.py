"""The daemon's job and lease bookkeeping, in-process and without VMs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runner.config import load_settings
from runner.errors import VMError
from runner.service.daemon import Daemon
from runner.service.executor import Outcome
from runner.service.jobs import JobSpec, JobState
from runner.service.scheduler import Resources
from runner.service.store import Store


@pytest.fixture
async def idle_daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    """A daemon that accepts jobs but never schedules them (no VMs are made)."""
    settings = load_settings(
        None, paths={"state_dir": tmp_path / "state", "cache_dir": tmp_path / "cache"},
        net={"enabled": False},
    )
    daemon = Daemon(settings)
    await daemon.store.open()
    daemon.accepting = True
    try:
        yield daemon
    finally:
        for task in daemon.tasks.values():
            task.cancel()
        if daemon.tasks:
            await asyncio.wait(list(daemon.tasks.values()))
        await daemon.store.close()


async def test_releasing_a_queued_lease_fails_its_waiter(idle_daemon: Daemon) -> None:
    waiter = asyncio.create_task(idle_daemon.acquire_lease("runner-1:job-1", None))
    await asyncio.sleep(0.1)
    job_id = idle_daemon.leases["runner-1:job-1"].job.id
    assert await idle_daemon.release_lease("runner-1:job-1")
    with pytest.raises(VMError, match="cancelled"):
        await asyncio.wait_for(waiter, 5)
    assert idle_daemon._lease_jobs == {}
    job = await idle_daemon.store.get(job_id)
    assert job is not None
    assert job.state is JobState.CANCELLED


async def test_cancelling_a_queued_lease_job_fails_its_waiter(idle_daemon: Daemon) -> None:
    waiter = asyncio.create_task(idle_daemon.acquire_lease("runner-1:job-2", None))
    await asyncio.sleep(0.1)
    await idle_daemon.cancel(idle_daemon.leases["runner-1:job-2"].job.id)
    with pytest.raises(VMError, match="cancelled by user"):
        await asyncio.wait_for(waiter, 5)
    # The key is still held (cleanup releases it), and says why it has no VM.
    assert idle_daemon.leases["runner-1:job-2"].ended == "cancelled by user"
    assert await idle_daemon.release_lease("runner-1:job-2")


async def test_cancel_while_launching_stops_the_job_and_returns_its_capacity(
    idle_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = asyncio.Event()

    async def run_forever(*_args: object, **_kwargs: object) -> Outcome:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr("runner.service.daemon.run_in_vm", run_forever)
    job = await idle_daemon.submit(JobSpec(script="true"))
    idle_daemon.queue.remove(job.id)
    launching = asyncio.create_task(idle_daemon._launch(job))
    await asyncio.sleep(0)  # _launch is now recording STARTING in SQLite
    await idle_daemon.cancel(job.id)
    await launching
    task = idle_daemon.tasks.get(job.id)
    if task is not None:
        await asyncio.wait([task], timeout=5)
    assert job.id not in idle_daemon.tasks, "the cancel was lost: the job still runs"
    assert job.state is JobState.CANCELLED
    assert idle_daemon.used == Resources()


async def test_an_internal_failure_still_ends_running_jobs_and_records_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a background task of the daemon crashes, running jobs are cancelled (their VMs
    torn down) and recorded before the store closes: nothing is left orphaned."""
    settings = load_settings(
        None,
        paths={"state_dir": tmp_path / "state", "cache_dir": tmp_path / "cache"},
        net={"enabled": False},
        daemon={"api_socket": tmp_path / "api.sock", "metrics_listen": ""},
    )
    daemon = Daemon(settings)
    started = asyncio.Event()

    async def job_that_runs_forever(*_args: object) -> Outcome:
        started.set()
        await asyncio.Event().wait()  # until cancelled
        raise AssertionError("unreachable")

    async def crashing_reconcile_loop() -> None:
        await started.wait()
        raise RuntimeError("reconcile blew up")

    monkeypatch.setattr("runner.service.daemon.run_in_vm", job_that_runs_forever)
    monkeypatch.setattr(daemon, "_reconcile_loop", crashing_reconcile_loop)
    serving = asyncio.create_task(daemon.serve())
    while not daemon.accepting:
        await asyncio.sleep(0.01)
    job = await daemon.submit(JobSpec(script="sleep 1000"))
    with pytest.raises(ExceptionGroup) as info:
        await asyncio.wait_for(serving, 30)
    assert info.group_contains(RuntimeError, match="reconcile blew up")
    assert daemon.tasks == {}
    store = Store(daemon.store.path)  # the daemon closed its own
    await store.open()
    try:
        recorded = await store.get(job.id)
    finally:
        await store.close()
    assert recorded is not None
    assert recorded.state is JobState.CANCELLED
    assert recorded.reason == "cancelled: the daemon hit an internal error"


async def test_two_prepares_for_one_key_hold_one_vm(idle_daemon: Daemon) -> None:
    first = asyncio.create_task(idle_daemon.acquire_lease("runner-1:job-9", None))
    second = asyncio.create_task(idle_daemon.acquire_lease("runner-1:job-9", None))
    await asyncio.sleep(0.2)
    assert len(idle_daemon.queue) == 1  # one job, so at most one VM
    assert await idle_daemon.release_lease("runner-1:job-9")
    for waiter in (first, second):
        with pytest.raises(VMError):
            await asyncio.wait_for(waiter, 5)
