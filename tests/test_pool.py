"""The warm pool: QEMU processes waiting in ``-incoming defer``, handed to jobs.

Real VMs through the session engine. Every test drains what it warmed, since
other modules count QEMU processes and the session checks for leaks at the end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Literal

import pytest
from structlog.testing import capture_logs

from runner.config import Profile, Settings
from runner.engine import Engine
from runner.execution import Command, command_work
from runner.execution import run as run_job
from runner.pool import PoolStats, WarmPool
from runner.snapshots import Snapshot
from runner.vm.backend import BackendContext, MachineSpec, TeardownReport, VMState
from runner.vm.qemu import QemuHypervisor, QemuMachine, new_vm_id
from tests.conftest import leftovers, qemu_processes

SLOT = "pool-test"


async def until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def stats(pool: WarmPool, snapshot: Snapshot) -> PoolStats:
    return pool.stats()[snapshot.key]


def incoming_pids(state_dir: Path) -> list[int]:
    """QEMU processes of this session still waiting for a snapshot to load."""
    pids = []
    for pid in qemu_processes(str(state_dir)):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-incoming" in argv:
            pids.append(pid)
    return sorted(pids)


def full(pool: WarmPool, snapshot: Snapshot, size: int) -> Callable[[], bool]:
    def check() -> bool:
        s = stats(pool, snapshot)
        return s.idle == size and s.preparing == 0

    return check


@pytest.fixture
async def warm(engine: Engine, snapshot: Snapshot, state_dir: Path) -> AsyncIterator[Engine]:
    """The session engine with two machines kept warm; drained (and checked) afterwards."""
    engine.warm(SLOT, Profile(warm=2), snapshot)
    await until(full(engine.pool, snapshot, 2), "the pool to fill")
    yield engine
    engine.warm(SLOT, Profile(warm=0), snapshot)
    await until(
        lambda: not any(leftovers(state_dir).values()), "the pool to drain and leave nothing"
    )


def _reaped(pid: int) -> bool:
    # A zombie keeps its /proc entry until asyncio's child watcher reaps it.
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.vm
async def test_pool_fills_hands_out_a_warm_machine_and_refills(
    warm: Engine, snapshot: Snapshot, state_dir: Path
) -> None:
    pool = warm.pool
    waiting = incoming_pids(state_dir)
    assert len(waiting) == 2  # two QEMUs started and waiting for a snapshot
    before = stats(pool, snapshot)

    machine = await warm.restore(snapshot)
    try:
        assert machine.pid in waiting
        assert machine.pooled
        # Its setup and spawn happened before the job asked; only load and agent remain.
        assert "spawn" not in machine.timings
        assert "setup" not in machine.timings
        assert machine.timings["load"] > 0
        after = stats(pool, snapshot)
        assert (after.hits, after.misses) == (before.hits + 1, before.misses)
        session = await machine.exec(Command(argv=["echo", "warm"]))
        assert b"".join([c.data async for c in session]) == b"warm\n"
        assert (await session.wait()).exit_code == 0
    finally:
        await machine.destroy()

    await until(full(pool, snapshot, 2), "the pool to refill")
    refilled = incoming_pids(state_dir)
    assert len(refilled) == 2
    assert machine.pid not in refilled


@pytest.mark.vm
async def test_job_through_a_warm_machine_has_its_output_and_exit_code(
    warm: Engine, snapshot: Snapshot
) -> None:
    before = stats(warm.pool, snapshot)
    chunks: list[tuple[str, bytes]] = []

    def sink(stream: str, data: bytes) -> None:
        chunks.append((stream, data))

    command = Command(script='echo "out $GREETING"; echo err >&2; exit 7', env={"GREETING": "hi"})
    profile = warm.settings.profile().model_copy(update={"warm": 1})
    report = await run_job(warm, profile, command_work(command, sink, 120), timeout_s=120,
                           note=lambda _n: None)
    assert report.outcome.exit_code == 7
    assert report.restored is not None
    assert report.restored.warm
    assert b"".join(d for s, d in chunks if s == "stdout") == b"out hi\n"
    assert b"".join(d for s, d in chunks if s == "stderr") == b"err\n"
    after = stats(warm.pool, snapshot)
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)


@pytest.mark.vm
async def test_machines_killed_while_idle_are_skipped_and_replaced(
    warm: Engine, snapshot: Snapshot, state_dir: Path
) -> None:
    pool = warm.pool
    victims = incoming_pids(state_dir)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    await until(lambda: all(_reaped(pid) for pid in victims), "the killed QEMUs to be reaped")
    await asyncio.sleep(0.1)  # the exit reaches the machine through a loop callback
    before = stats(pool, snapshot)

    machine = await warm.restore(snapshot)
    try:
        assert not machine.pooled  # both pooled ones were dead: prepared afresh
        assert machine.pid not in victims
        session = await machine.exec(Command(argv=["echo", "still runs"]))
        assert b"".join([c.data async for c in session]) == b"still runs\n"
    finally:
        await machine.destroy()
    after = stats(pool, snapshot)
    assert after.discarded == before.discarded + 2
    assert after.misses == before.misses + 1

    await until(full(pool, snapshot, 2), "the pool to replace the dead machines")
    await until(lambda: len(leftovers(state_dir)["vm_dirs"]) == 2, "dead machines to be reaped")
    assert not set(incoming_pids(state_dir)) & set(victims)


@pytest.mark.vm
async def test_pooled_machine_that_dies_unnoticed_falls_back_to_a_fresh_one(
    warm: Engine, snapshot: Snapshot, state_dir: Path
) -> None:
    victims = incoming_pids(state_dir)
    before = stats(warm.pool, snapshot)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    # No await in between: the loop has not reaped them, so acquire() still sees
    # them alive and hands one out; resume must fail and the engine start afresh.
    machine = await warm.restore(snapshot)
    try:
        assert not machine.pooled
        assert machine.pid not in victims
        session = await machine.exec(Command(argv=["echo", "fallback"]))
        assert b"".join([c.data async for c in session]) == b"fallback\n"
    finally:
        await machine.destroy()
    after = stats(warm.pool, snapshot)
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)


@pytest.mark.vm
async def test_a_new_snapshot_for_the_same_slot_replaces_the_old_machines(
    engine: Engine, snapshot: Snapshot, state_dir: Path
) -> None:
    # Same files under another key: to the pool, a different snapshot.
    newer = replace(snapshot, key=snapshot.key + "-v2")
    engine.warm(SLOT, Profile(warm=1), snapshot)
    try:
        await until(full(engine.pool, snapshot, 1), "the first snapshot's machine")
        old = incoming_pids(state_dir)
        engine.warm(SLOT, Profile(warm=1), newer)
        assert stats(engine.pool, snapshot).target == 0
        await until(full(engine.pool, newer, 1), "the new snapshot's machine")
        await until(full(engine.pool, snapshot, 0), "the old snapshot's machine to go")
        current = incoming_pids(state_dir)
        assert len(current) == 1
        assert current != old
    finally:
        engine.warm(SLOT, Profile(warm=0), newer)
        await until(lambda: not any(leftovers(state_dir).values()), "the pool to drain")


@pytest.mark.vm
async def test_close_leaves_nothing_even_with_a_refill_under_way(
    engine: Engine, snapshot: Snapshot, state_dir: Path
) -> None:
    async with WarmPool(engine.hypervisor) as pool:
        pool.set_target(snapshot, 3)
        await until(
            lambda: stats(pool, snapshot).idle >= 1 and stats(pool, snapshot).preparing == 1,
            "one idle machine and one being prepared",
        )
        assert qemu_processes(str(state_dir))
    assert not any(leftovers(state_dir).values())
    assert stats(pool, snapshot).idle == 0
    assert pool.acquire(snapshot) is None


async def test_refill_errors_are_logged_and_retried_without_crashing(
    settings: Settings, tmp_path: Path
) -> None:
    hypervisor = QemuHypervisor(BackendContext(settings.vm, tmp_path / "vms", None))
    spec = MachineSpec(
        vcpus=1,
        memory_mib=128,
        kernel=tmp_path / "vmlinux",
        initramfs=tmp_path / "initramfs",
        cmdline="",
        accel="tcg",
        cpu="max",
        network=False,
    )
    missing = Snapshot(path=tmp_path / "gone", key="missing", spec=spec, manifest={})
    with capture_logs() as logs:
        async with WarmPool(hypervisor) as pool:
            pool.set_target(missing, 1)
            # First retry after 0.5 s, the second after 1 s more.
            await until(lambda: stats(pool, missing).refill_errors >= 2, "two failed refills", 10)
            assert pool.acquire(missing) is None
    failures = [e for e in logs if e["event"] == "pool refill failed; will retry"]
    assert [e["attempt"] for e in failures[:2]] == [1, 2]
    assert [e["retry_in_s"] for e in failures[:2]] == [0.5, 1.0]
    assert "incomplete" in failures[0]["error"]


class _SlowTeardown(QemuMachine):
    """A machine with no QEMU whose teardown takes a while (like a QMP quit that hangs)."""

    async def _stop_vmm(self, report: TeardownReport) -> Literal["none"]:
        await asyncio.sleep(0.5)
        return "none"


class _SlowHypervisor(QemuHypervisor):
    async def prepare(self, snapshot: Snapshot) -> QemuMachine:
        machine = _SlowTeardown(new_vm_id(), self.settings, self.vms_dir / "m")
        machine.directory.mkdir(parents=True)
        return machine


async def test_close_waits_for_a_teardown_the_pool_had_begun(
    settings: Settings, tmp_path: Path
) -> None:
    hypervisor = _SlowHypervisor(BackendContext(settings.vm, tmp_path / "vms", None))
    spec = MachineSpec(vcpus=1, memory_mib=128, kernel=tmp_path / "k", initramfs=tmp_path / "i",
                       cmdline="", accel="tcg", cpu="max", network=False)
    snap = Snapshot(path=tmp_path / "s", key="slow", spec=spec, manifest={})
    async with WarmPool(hypervisor) as pool:
        pool.set_target(snap, 1)
        await until(full(pool, snap, 1), "the pool to fill", 5)
        machine = pool._entries["slow"].idle[0]
        assert isinstance(machine, _SlowTeardown)
        pool.set_target(snap, 0)  # the refiller starts destroying it...
        await until(lambda: machine.state is VMState.STOPPING, "the trim to begin", 5)
    # ... and close() must not return (and let the daemon exit) before it has finished.
    assert machine.state is VMState.DESTROYED
    assert not machine.directory.exists()
