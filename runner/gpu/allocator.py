"""Handing specific devices to VMs: leases, quarantine, recovery after a crash.

Every lease is written to a file in the state directory *before* its devices
are taken from the host, with the drivers they had, so a daemon that dies
mid-job leaves enough behind for the next one to give them back
(``recover``). A device whose reset or rebind fails is quarantined: it gets
no more jobs (across restarts too) until the operator clears it.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from runner.errors import GpuError, GpuReleaseError, GpuUnavailable
from runner.gpu.binding import Bound
from runner.gpu.config import GpuRequest
from runner.gpu.source import DeviceSource
from runner.gpu.sysfs import GpuUnit, PciFunction
from runner.private_file import write_private

log = structlog.get_logger("snapfleet.gpu")

STATE_VERSION = 1


@dataclass(frozen=True)
class GpuLease:
    """The devices one VM holds."""

    owner: str
    units: tuple[GpuUnit, ...]
    plans: Mapping[str, tuple[Bound, ...]] = field(default_factory=dict)  # unit id -> plan


@dataclass(frozen=True)
class LeaseRecord:
    """A lease as the state file keeps it."""

    owner: str
    unit: str
    plan: tuple[Bound, ...]


@dataclass(frozen=True)
class RecoveryReport:
    released: tuple[str, ...] = ()  # unit ids given back to the host
    quarantined: tuple[str, ...] = ()
    held: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # unit -> pids holding it


def stale(records: Iterable[LeaseRecord], live_owners: Iterable[str],
          holders: Mapping[str, tuple[int, ...]]) -> tuple[list[LeaseRecord], list[LeaseRecord]]:
    """Split lease records into (to release, to keep).

    A record is released when its owner is no live VM of this daemon and no
    process still holds the device's VFIO group (a QEMU that outlived its
    daemon keeps its device until it is killed).
    """
    live = set(live_owners)
    release: list[LeaseRecord] = []
    keep: list[LeaseRecord] = []
    for record in records:
        (keep if record.owner in live or holders.get(record.unit) else release).append(record)
    return release, keep


def vfio_holders(group: str | None, proc: Path = Path("/proc")) -> tuple[int, ...]:
    """Pids with ``/dev/vfio/<group>`` open."""
    if group is None:
        return ()
    target = f"/dev/vfio/{group}"
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    pids.append(int(entry.name))
                    break
            except OSError:
                continue
    return tuple(pids)


class GpuAllocator:
    """Hands out a source's units, never one unit to two owners at once."""

    def __init__(self, source: DeviceSource, state_file: Path, *,
                 holders: Callable[[GpuUnit], tuple[int, ...]] | None = None) -> None:
        self.source = source
        self.state_file = state_file
        self._holders = holders or (lambda unit: vfio_holders(unit.group))
        self._lock = asyncio.Lock()
        self._records: dict[str, LeaseRecord] = {}  # unit id -> record
        self.quarantined: dict[str, str] = {}  # unit id -> why
        self.quarantine_events = 0  # a counter for metrics: devices quarantined since start
        self._load()

    # -- what the scheduler and metrics read

    def stats(self) -> dict[str, int]:
        units = [u.id for u in self.source.units()]
        leased = sum(u in self._records for u in units)
        sick = sum(u in self.quarantined for u in units)
        return {"total": len(units), "leased": leased, "quarantined": sick,
                "free": len(units) - leased - sick, "quarantine_events": self.quarantine_events}

    def leased_to(self, owner: str) -> list[str]:
        return [r.unit for r in self._records.values() if r.owner == owner]

    def free_units(self) -> list[GpuUnit]:
        """Units neither leased nor quarantined, in the source's order."""
        return [u for u in self.source.units()
                if u.id not in self._records and u.id not in self.quarantined]

    # -- lifecycle

    async def acquire(self, owner: str, request: GpuRequest,
                      units: Sequence[str] | None = None) -> GpuLease:
        """Take ``request.count`` free, healthy units (of ``request.model``; among ``units``
        when given: the scheduler's choice) for ``owner``.

        GpuUnavailable when too few are free; GpuBindError when the host would
        not let go (the units are back in the pool, or quarantined if even that
        failed). Nothing stays recorded for ``owner`` after an error.
        """
        async with self._lock:
            if any(r.owner == owner for r in self._records.values()):
                raise GpuError(f"{owner} already holds GPUs")
            free = [u for u in self.free_units()
                    if (request.model is None or u.model == request.model)
                    and (units is None or u.id in units)]
            if len(free) < request.count:
                raise GpuUnavailable(f"{owner} needs {request}, {len(free)} free"
                                     f" ({self.stats()['leased']} leased,"
                                     f" {len(self.quarantined)} quarantined)")
            chosen = tuple(free[:request.count])
            plans = {u.id: self.source.plan(u) for u in chosen}
            for unit in chosen:
                self._records[unit.id] = LeaseRecord(owner, unit.id, plans[unit.id])
            await self._save()
        claimed: list[GpuUnit] = []
        try:
            for unit in chosen:
                await self.source.claim(plans[unit.id])
                claimed.append(unit)
        except BaseException as exc:
            # The unit that failed was undone by the source (or could not be: then it is
            # quarantined); those claimed before it go back now, even when cancelled.
            pending = [u for u in chosen if u not in claimed]
            if isinstance(exc, GpuReleaseError):
                await self._quarantine(pending[0].id, str(exc))
            await asyncio.shield(self._give_back(claimed, plans))
            async with self._lock:
                for unit in pending:
                    self._records.pop(unit.id, None)
                await self._save()
            raise
        lease = GpuLease(owner, chosen, plans)
        log.info("gpu_acquired", owner=owner, devices=[u.id for u in chosen],
                 models=[u.model for u in chosen])
        return lease

    async def release(self, lease: GpuLease) -> list[str]:
        """Give ``lease``'s units back to the host; returns the ids quarantined on the way."""
        sick = await self._give_back(list(lease.units), lease.plans)
        log.info("gpu_released", owner=lease.owner, devices=[u.id for u in lease.units],
                 quarantined=sick)
        return sick

    async def recover(self, live_owners: Iterable[str]) -> RecoveryReport:
        """After a crash: give back every leased unit that no live VM owns.

        The daemon calls it at start (after reclaiming orphaned QEMUs), with the
        VMs it still runs (none, at start).
        """
        by_id = {u.id: u for u in self.source.units()}
        holders = {uid: self._holders(by_id[uid]) if uid in by_id else ()
                   for uid in self._records}
        release, _keep = stale(self._records.values(), live_owners, holders)
        units = [by_id.get(r.unit) or _unknown_unit(r) for r in release]
        plans = {r.unit: r.plan for r in release}
        sick = await self._give_back(units, plans)
        report = RecoveryReport(
            released=tuple(r.unit for r in release if r.unit not in sick),
            quarantined=tuple(sick),
            held={uid: pids for uid, pids in holders.items() if pids},
        )
        if release or report.held:
            log.warning("gpu_recovered", released=list(report.released),
                        quarantined=list(report.quarantined),
                        held={k: list(v) for k, v in report.held.items()})
        return report

    async def unquarantine(self, unit_id: str) -> None:
        """The operator fixed ``unit_id`` (or rebooted): let it take jobs again."""
        async with self._lock:
            if self.quarantined.pop(unit_id, None) is None:
                raise GpuError("is not quarantined", device=unit_id)
            await self._save()
        log.info("gpu_unquarantined", device=unit_id)

    # -- internals

    async def _give_back(self, units: Sequence[GpuUnit],
                         plans: Mapping[str, tuple[Bound, ...]]) -> list[str]:
        sick = []
        for unit in units:
            try:
                await self.source.give_back(plans.get(unit.id, ()))
            except GpuError as exc:
                await self._quarantine(unit.id, str(exc))
                sick.append(unit.id)
        async with self._lock:
            for unit in units:
                self._records.pop(unit.id, None)
            await self._save()
        return sick

    async def _quarantine(self, unit_id: str, reason: str) -> None:
        async with self._lock:
            self.quarantined[unit_id] = reason
            self.quarantine_events += 1
            await self._save()
        log.error("gpu_quarantined", device=unit_id, reason=reason)

    def _load(self) -> None:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise GpuError(f"GPU state file {self.state_file} is unreadable: {exc}") from exc
        if data.get("version") != STATE_VERSION:
            raise GpuError(f"GPU state file {self.state_file} has an unknown version")
        for item in data.get("leases", []):
            plan = tuple(Bound.from_json(b) for b in item["plan"])
            self._records[item["unit"]] = LeaseRecord(item["owner"], item["unit"], plan)
        self.quarantined = dict(data.get("quarantined", {}))

    async def _save(self) -> None:
        data: dict[str, Any] = {
            "version": STATE_VERSION,
            "leases": [{"owner": r.owner, "unit": r.unit, "plan": [b.to_json() for b in r.plan]}
                       for r in self._records.values()],
            "quarantined": self.quarantined,
        }
        await asyncio.to_thread(write_private, self.state_file, json.dumps(data, indent=1))


def _unknown_unit(record: LeaseRecord) -> GpuUnit:
    """A unit the source no longer lists (gone from the config): still give it back."""
    fn = PciFunction(record.unit, "", "", "", None, None, False)
    return GpuUnit(fn, (fn,))

