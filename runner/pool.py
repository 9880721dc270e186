"""The warm pool: VMM processes already started and waiting for a snapshot.

Spawning a VMM (plus the clone's directory, namespace and overlay) is most of
the host-side cost of a restore. The pool keeps, per snapshot, a few machines
made by ``Hypervisor.prepare`` — everything done except loading the
snapshot — so a job only pays for ``resume``.

Refilling runs in background tasks the pool owns (``start``/``close`` or
``async with``). At most ``max_refills`` machines are prepared at once, so
refilling takes a bounded share of the host away from running jobs. A refill
that fails is logged and retried with exponential backoff; it never raises
into the daemon.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from dataclasses import dataclass, field

import structlog

from runner.snapshots import Snapshot
from runner.vm.backend import Hypervisor, Machine, VMState

log = structlog.get_logger("snapfleet.pool")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0


class PoolState(enum.Enum):
    """Lifecycle of a pool: targets may be set in NEW, refills run only in RUNNING."""

    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


@dataclass(frozen=True)
class PoolStats:
    """One snapshot's pool, as counted so far."""

    idle: int
    """Prepared machines waiting now."""
    target: int
    """How many the pool tries to keep."""
    hits: int
    """``acquire`` calls answered with a machine."""
    misses: int
    """``acquire`` calls answered with None (the caller prepared its own)."""
    preparing: int
    """Refills under way now."""
    discarded: int
    """Idle machines found dead at ``acquire`` and thrown away."""
    refill_errors: int
    """Refills that failed (each was logged and retried)."""


@dataclass(eq=False)
class _Entry:
    """The pool for one snapshot."""

    snapshot: Snapshot
    target: int = 0
    idle: deque[Machine] = field(default_factory=deque)
    # Machines to destroy off the job's path: dead ones found by acquire.
    dead: list[Machine] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    hits: int = 0
    misses: int = 0
    preparing: int = 0
    discarded: int = 0
    refill_errors: int = 0

    def stats(self) -> PoolStats:
        return PoolStats(
            idle=len(self.idle),
            target=self.target,
            hits=self.hits,
            misses=self.misses,
            preparing=self.preparing,
            discarded=self.discarded,
            refill_errors=self.refill_errors,
        )


class WarmPool:
    """Prepared machines per snapshot, refilled in the background.

    ``set_target`` says how many to keep; ``acquire`` hands one out or returns
    None; ``close`` destroys everything the pool holds.
    """

    def __init__(self, hypervisor: Hypervisor, *, max_refills: int = 1) -> None:
        if max_refills < 1:
            raise ValueError("max_refills must be at least 1")
        self._hypervisor = hypervisor
        self._refills = asyncio.Semaphore(max_refills)
        self._entries: dict[str, _Entry] = {}
        # slot (normally a profile name) -> (snapshot key, size); sizes for one key add up.
        self._slots: dict[str, tuple[str, int]] = {}
        # Machines whose teardown the pool began and has not seen finish: close() awaits them.
        self._destroying: set[Machine] = set()
        self._state = PoolState.NEW

    @property
    def state(self) -> PoolState:
        return self._state

    async def __aenter__(self) -> WarmPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Begin refilling towards the targets set so far (and any set later)."""
        if self._state is not PoolState.NEW:
            raise RuntimeError(f"cannot start a pool that is {self._state.value}")
        self._state = PoolState.RUNNING
        for entry in self._entries.values():
            self._ensure_task(entry)

    def set_target(self, snapshot: Snapshot, size: int, *, slot: str | None = None) -> None:
        """Keep ``size`` idle prepared machines for ``snapshot`` (0 = none).

        ``slot`` names who asks, normally a profile (default: the snapshot
        itself). Setting a slot to another snapshot drops its old one: when no
        slot wants a snapshot any more, its idle machines are destroyed. Sizes
        of different slots naming the same snapshot add up. Returns at once;
        the pool fills or drains in the background.
        """
        if size < 0:
            raise ValueError("pool size cannot be negative")
        if self._state is PoolState.CLOSED:
            raise RuntimeError("the pool is closed")
        name = slot if slot is not None else snapshot.key
        old = self._slots.get(name)
        if size:
            self._slots[name] = (snapshot.key, size)
        else:
            self._slots.pop(name, None)
        entry = self._entry(snapshot)
        entry.snapshot = snapshot  # a reloaded snapshot with the same key is the same files
        touched = {snapshot.key} | ({old[0]} if old else set())
        for key in touched:
            self._retarget(self._entries[key])

    def acquire(self, snapshot: Snapshot) -> Machine | None:
        """An idle prepared machine for ``snapshot``, now, or None if there is none.

        The machine leaves the pool (the caller owns it: resume it, or destroy
        it) and the refiller is woken to replace it. Machines whose VMM died
        while idle are skipped and destroyed in the background.
        """
        entry = self._entries.get(snapshot.key)
        if entry is None:
            entry = self._entry(snapshot)
        while entry.idle:
            machine = entry.idle.popleft()
            # The watcher marks a VM FAILED as soon as its VMM is reaped.
            if machine.exit_status is None and machine.state is VMState.STARTING:
                entry.hits += 1
                self._wake(entry)
                return machine
            entry.discarded += 1
            log.warning(
                "idle machine died; discarding it",
                vm_id=machine.vm_id,
                snapshot=snapshot.key,
                exit_status=machine.exit_status,
            )
            entry.dead.append(machine)
        entry.misses += 1
        self._wake(entry)
        return None

    def stats(self) -> dict[str, PoolStats]:
        """Per snapshot key: idle, target, hits, misses and the rest."""
        return {key: entry.stats() for key, entry in self._entries.items()}

    def idle_by_slot(self) -> dict[str, int]:
        """Idle machines waiting for each slot's snapshot (slots sharing one share them)."""
        return {slot: len(self._entries[key].idle) if key in self._entries else 0
                for slot, (key, _size) in self._slots.items()}

    def held(self) -> int:
        """Machines the pool has now, idle or being prepared (no job's VMs among them)."""
        return sum(len(e.idle) + e.preparing for e in self._entries.values())

    async def close(self) -> None:
        """Stop refilling (awaiting the tasks) and destroy every machine the pool holds."""
        if self._state is PoolState.CLOSED:
            return
        self._state = PoolState.CLOSED
        tasks = [e.task for e in self._entries.values() if e.task is not None]
        for task in tasks:
            task.cancel()
        for task, outcome in zip(
            tasks, await asyncio.gather(*tasks, return_exceptions=True), strict=True
        ):
            if isinstance(outcome, Exception):
                log.error("pool task failed", task=task.get_name(), error=repr(outcome))
        machines: list[Machine] = []
        for entry in self._entries.values():
            entry.task = None
            machines += entry.idle
            machines += entry.dead
            entry.idle.clear()
            entry.dead.clear()
        # A refiller cancelled while destroying left that teardown running in its own task.
        machines += self._destroying
        # A machine's destroy() runs in a task of its own, so every teardown
        # finishes even if close() itself is cancelled while waiting.
        await asyncio.gather(*(self._destroy(m) for m in machines))

    # -- internals --------------------------------------------------------

    def _entry(self, snapshot: Snapshot) -> _Entry:
        entry = self._entries.get(snapshot.key)
        if entry is None:
            entry = self._entries[snapshot.key] = _Entry(snapshot)
        return entry

    def _retarget(self, entry: _Entry) -> None:
        key = entry.snapshot.key
        entry.target = sum(size for k, size in self._slots.values() if k == key)
        self._wake(entry)

    def _wake(self, entry: _Entry) -> None:
        entry.wake.set()
        self._ensure_task(entry)

    def _ensure_task(self, entry: _Entry) -> None:
        if self._state is not PoolState.RUNNING:
            return
        if entry.task is None or entry.task.done():
            entry.task = asyncio.create_task(
                self._maintain(entry), name=f"pool-{entry.snapshot.key}"
            )

    async def _maintain(self, entry: _Entry) -> None:
        """Keep one snapshot's pool at its target until there is nothing left to do."""
        failures = 0
        while True:
            try:
                if await self._step(entry):
                    failures = 0
                    continue
            except Exception as exc:
                # Whatever went wrong, the loop must live on: log, back off, retry.
                failures += 1
                entry.refill_errors += 1
                delay = min(BACKOFF_FIRST_S * 2 ** (failures - 1), BACKOFF_MAX_S)
                log.warning(
                    "pool refill failed; will retry",
                    snapshot=entry.snapshot.key,
                    error=str(exc),
                    error_type=type(exc).__name__,
                    attempt=failures,
                    retry_in_s=delay,
                )
                # A plain sleep, not the wake event: acquire() wakes the refiller
                # on every job, which would turn backoff into a busy retry.
                await asyncio.sleep(delay)
                continue
            if entry.target == 0 and not entry.idle:
                # Nothing to keep: end, and let the next set_target/acquire start a new task.
                return
            entry.wake.clear()
            await entry.wake.wait()

    async def _step(self, entry: _Entry) -> bool:
        """Do one piece of work (reap, trim or refill); False when there was none."""
        if entry.dead:
            await self._destroy(entry.dead.pop())
            return True
        if len(entry.idle) > entry.target:
            await self._destroy(entry.idle.pop())
            return True
        if len(entry.idle) < entry.target:
            await self._refill(entry)
            return True
        return False

    async def _refill(self, entry: _Entry) -> None:
        async with self._refills:
            # The target may have dropped, or jobs taken nothing, while we queued.
            if len(entry.idle) >= entry.target:
                return
            entry.preparing += 1
            try:
                # prepare() destroys its half-built machine if it fails or is cancelled.
                machine = await self._hypervisor.prepare(entry.snapshot)
            finally:
                entry.preparing -= 1
        entry.idle.append(machine)

    async def _destroy(self, machine: Machine) -> None:
        # Runs in the background or in close(): a failed teardown is reported, never raised.
        self._destroying.add(machine)
        try:
            report = await machine.destroy()
        except asyncio.CancelledError:
            raise  # the teardown goes on in its own task; close() waits for it
        except Exception as exc:
            self._destroying.discard(machine)
            log.warning("destroying pooled machine failed", vm_id=machine.vm_id, error=str(exc))
            return
        self._destroying.discard(machine)
        for problem in report.errors:
            log.warning("pooled machine teardown", vm_id=machine.vm_id, problem=problem)


__all__ = ["PoolState", "PoolStats", "WarmPool"]
