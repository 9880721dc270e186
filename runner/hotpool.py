"""The hot pool: clones already restored, their agent answering, waiting for a job.

A warm machine (`runner.pool`) still has to load its snapshot and wake its
agent; a hot one has done that, and has run one throw-away command so the
guest's fork/exec/shell paths are already translated (under TCG every clone
starts with an empty translation cache). Its network is up under its
profile's policy. At assignment `Hypervisor.assign` makes it the job's: the
clock, a fresh RNG reseed (kernel and the agent's own), hostname and env.

A hot clone carries nothing from its wait into a job: the throw-away command
writes no file and leaves no process, and refills use a fixed placeholder
hostname and no env. A clone hot for longer than ``max_age_s`` is recycled.

Refills yield to jobs: one at a time, and only while no job is restoring
(``quiet`` returns when none is), so a burst of jobs is never slowed down by the pool refilling
behind it. Failures are logged and retried with backoff, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from runner.agent.messages import Command
from runner.net.policy import EgressPolicy
from runner.snapshots import Snapshot
from runner.vm.backend import Hypervisor, Machine, VMState

log = structlog.get_logger("snapfleet.hotpool")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
WARMUP = Command(argv=["/bin/sh", "-c", (
    # What job scripts run first (GitLab's are bash, with these tools; a GitHub
    # runner starts from bash scripts too), so their code is translated before a
    # job waits on it. It writes nothing and leaves no process.
    "command -v bash >/dev/null || exit 0; exec bash --noprofile --norc -c '"
    "printf \"%s\" x >/dev/null; mkdir -p /; rm -rf /nonexistent/snapfleet-hot; cat /dev/null;"
    " timeout -k 5 5 bash --noprofile --norc -c true'"
)])
HOT_HOSTNAME = "snapfleet-hot"


@dataclass(eq=False)
class _Slot:
    """One profile's hot clones."""

    key: str
    snapshot: Snapshot
    policy: EgressPolicy
    target: int = 0
    idle: deque[tuple[Machine, float]] = field(default_factory=deque)  # (machine, since)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    preparing: int = 0
    hits: int = 0
    misses: int = 0
    recycled: int = 0
    refill_errors: int = 0


@dataclass(frozen=True)
class HotStats:
    idle: int
    target: int
    hits: int
    misses: int
    preparing: int
    recycled: int
    refill_errors: int


class HotPool:
    """Per profile, ``target`` clones restored and waiting. Use ``start``/``close``."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        *,
        quiet: Callable[[], Awaitable[object]] | None = None,
        max_age_s: float = 600.0,
    ) -> None:
        self._hypervisor = hypervisor
        self._quiet = quiet or _now
        self.max_age_s = max_age_s
        self._slots: dict[str, _Slot] = {}
        self._refills = asyncio.Semaphore(1)
        self._running = False
        self._destroying: set[asyncio.Task[object]] = set()

    async def start(self) -> None:
        self._running = True
        for slot in self._slots.values():
            self._ensure_task(slot)

    def set_target(
        self, key: str, snapshot: Snapshot, size: int, policy: EgressPolicy
    ) -> None:
        """Keep ``size`` hot clones of ``snapshot`` under ``policy`` for ``key`` (a profile).

        A new snapshot or policy for the same key recycles the old clones.
        """
        slot = self._slots.get(key)
        if slot is not None and (slot.snapshot.key != snapshot.key or slot.policy != policy):
            while slot.idle:
                self._discard(slot.idle.popleft()[0])
            slot.snapshot, slot.policy = snapshot, policy
        if slot is None:
            slot = self._slots[key] = _Slot(key, snapshot, policy)
        slot.target = size
        self._wake(slot)

    def acquire(self, key: str) -> Machine | None:
        """A hot clone for ``key``, now, or None. The caller must `Hypervisor.assign` it."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        now = time.monotonic()
        while slot.idle:
            machine, since = slot.idle.popleft()
            if (machine.state is VMState.READY and machine.exit_status is None
                    and now - since <= self.max_age_s):
                slot.hits += 1
                self._wake(slot)
                return machine
            self._discard(machine)
        slot.misses += 1
        self._wake(slot)
        return None

    def held(self) -> int:
        """Clones the pool holds now, idle or being made (no job's VMs among them)."""
        return sum(len(s.idle) + s.preparing for s in self._slots.values())

    def stats(self) -> dict[str, HotStats]:
        return {key: HotStats(len(s.idle), s.target, s.hits, s.misses, s.preparing,
                              s.recycled, s.refill_errors) for key, s in self._slots.items()}

    async def close(self) -> None:
        """Stop refilling and destroy every hot clone."""
        self._running = False
        tasks = [s.task for s in self._slots.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for slot in self._slots.values():
            while slot.idle:
                self._discard(slot.idle.popleft()[0])
        if self._destroying:
            await asyncio.gather(*self._destroying, return_exceptions=True)

    # -- internals --------------------------------------------------------

    def _wake(self, slot: _Slot) -> None:
        slot.wake.set()
        self._ensure_task(slot)

    def _ensure_task(self, slot: _Slot) -> None:
        if self._running and (slot.task is None or slot.task.done()):
            slot.task = asyncio.create_task(self._maintain(slot), name=f"hot-{slot.key[:16]}")

    def _discard(self, machine: Machine) -> None:
        task: asyncio.Task[object] = asyncio.create_task(machine.destroy())
        self._destroying.add(task)
        task.add_done_callback(self._destroying.discard)

    async def _maintain(self, slot: _Slot) -> None:
        failures = 0
        while True:
            self._recycle_old(slot)
            while len(slot.idle) > slot.target:
                self._discard(slot.idle.pop()[0])
            if len(slot.idle) < slot.target:
                try:
                    await self._refill(slot)
                    failures = 0
                except Exception as exc:
                    failures += 1
                    slot.refill_errors += 1
                    delay = min(BACKOFF_FIRST_S * 2 ** (failures - 1), BACKOFF_MAX_S)
                    log.warning("hot pool refill failed; will retry", profile=slot.key[:40],
                                error=str(exc), attempt=failures, retry_in_s=delay)
                    await asyncio.sleep(delay)
                continue
            if slot.target == 0:
                return
            slot.wake.clear()
            oldest = min((since for _, since in slot.idle), default=time.monotonic())
            wait = max(1.0, oldest + self.max_age_s - time.monotonic())
            with contextlib.suppress(TimeoutError):  # then it is time to look at ages again
                await asyncio.wait_for(slot.wake.wait(), wait)

    def _recycle_old(self, slot: _Slot) -> None:
        now = time.monotonic()
        keep = deque((m, since) for m, since in slot.idle if now - since <= self.max_age_s)
        for machine, since in slot.idle:
            if now - since > self.max_age_s:
                slot.recycled += 1
                log.info("recycling a clone hot for too long", vm_id=machine.vm_id,
                         hot_s=round(now - since))
                self._discard(machine)
        slot.idle = keep

    async def _refill(self, slot: _Slot) -> None:
        async with self._refills:
            await self._quiet()  # a job that is restoring goes first
            if len(slot.idle) >= slot.target:
                return
            slot.preparing += 1
            try:
                machine = await self._hypervisor.restore(
                    slot.snapshot, hostname=HOT_HOSTNAME, policy=slot.policy
                )
                try:
                    warmup = await machine.exec(WARMUP)
                    await warmup.wait()
                except BaseException:
                    await machine.destroy()
                    raise
            finally:
                slot.preparing -= 1
        if machine.prepared_for != slot.snapshot.key:  # retargeted while it was made
            self._discard(machine)
            return
        slot.idle.append((machine, time.monotonic()))


async def _now() -> None:
    return None


__all__ = ["HotPool", "HotStats"]
