"""One job's GPUs: taken from the allocator, attached to its VM, checked in the guest,
given back after the VM is gone.

`GpuClaim` is what the run path (`runner.execution.run`) holds for a GPU
profile. The devices are taken while the VM is restored (binding a real GPU to
vfio-pci can take a second), plugged once the clone answers (or put on the
command line of a cold boot), and the job starts only after the guest shows
them. `release` always runs after the VM's teardown: VFIO lets go of a device
only when its QEMU has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Sequence

import structlog

from runner.errors import SnapfleetError
from runner.gpu.allocator import GpuAllocator, GpuLease
from runner.gpu.config import GpuRequest
from runner.gpu.guest import Verdict, conclude, expect, watch
from runner.vm.backend import Devices, Machine

log = structlog.get_logger("snapfleet.gpu")


class GpuClaim:
    """The devices of one run, from acquire to release. Not reusable."""

    def __init__(self, allocator: GpuAllocator, request: GpuRequest, *,
                 hotplug_timeout_s: float, units: Sequence[str] | None = None) -> None:
        self.allocator = allocator
        self.request = request
        self.units = units  # the scheduler's choice, when it made one
        self.hotplug_timeout_s = hotplug_timeout_s
        # Not a VM id: the devices are taken while the VM is still being made.
        self.owner = f"run-{secrets.token_hex(4)}"
        self._task: asyncio.Task[GpuLease] | None = None
        self.attach_s: float | None = None  # attach until the guest showed the devices
        self.unit_ids: tuple[str, ...] = ()  # what was taken, once taken

    def start(self) -> None:
        """Begin taking the devices (concurrently with the restore)."""
        if self._task is None:
            taking = self.allocator.acquire(self.owner, self.request, self.units)
            self._task = asyncio.create_task(taking, name=f"gpu-acquire-{self.owner}")

    async def lease(self) -> GpuLease:
        """The lease, once taken (GpuUnavailable, GpuBindError)."""
        self.start()
        assert self._task is not None
        # Shielded: a half-finished acquire is never cancelled; `release` waits it out.
        return await asyncio.shield(self._task)

    async def devices(self) -> Devices:
        lease = await self.lease()
        return Devices(self.allocator.source, lease.units)

    async def attach(self, machine: Machine, *, plug: bool = True) -> Verdict:
        """Plug the devices into a READY ``machine`` (``plug`` False: a cold boot had them
        from the start) and wait until its guest shows them; GpuError with the reason
        when it does not within the hot-plug timeout."""
        devices = await self.devices()
        self.unit_ids = tuple(u.id for u in devices.units)
        expectation = expect(devices.units, driver=self.allocator.source.guest_driver)
        started = time.monotonic()
        session = await watch(machine, expectation, self.hotplug_timeout_s)
        if plug:
            try:
                await machine.attach(devices)
            except BaseException:
                with contextlib.suppress(SnapfleetError):
                    await session.cancel()
                raise
        verdict = await conclude(session, expectation, self.hotplug_timeout_s)
        self.attach_s = time.monotonic() - started
        machine.timings["gpu"] = self.attach_s
        log.info("gpu_attached", vm_id=machine.vm_id, owner=self.owner, hotplug=plug,
                 devices=[u.id for u in devices.units],
                 guest=[f"{d.address}={d.model}/{d.driver or '-'}" for d in verdict.devices],
                 ms=round(self.attach_s * 1000, 1))
        return verdict

    async def release(self) -> list[str]:
        """Give the devices back (after the VM is destroyed); the ids quarantined on the way.

        Safe whatever happened: nothing taken, acquire failed, or still under way
        (it is waited for, then undone)."""
        if self._task is None:
            return []
        await asyncio.wait([self._task])  # never cancels it: a half-done acquire finishes
        if self._task.cancelled() or self._task.exception() is not None:
            return []  # acquire failed and undid itself
        return await self.allocator.release(self._task.result())


def describe(verdict: Verdict, seconds: float | None) -> str:
    """A job-log line for the devices the guest took."""
    shown = ", ".join(f"{d.model} at {d.address}" + (f" ({d.driver})" if d.driver else "")
                      for d in verdict.devices)
    took = "" if seconds is None else f" after {seconds * 1000:.0f} ms"
    line = f"GPU ready in the guest{took}: {shown}"
    for smi in verdict.smi:
        line += f"; {smi}"
    return line

