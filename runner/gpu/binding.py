"""Moving a whole IOMMU group to ``vfio-pci`` and giving it back.

The kernel's own sequence, per function: write ``vfio-pci`` to its
``driver_override``, unbind it from its driver, write its address to
``drivers_probe`` (the PCI core then binds the overridden driver). Giving it
back: reset it while vfio-pci still holds it, restore the old override,
unbind from vfio-pci and probe again, so the original driver takes it.
Writes run in a thread (a host driver may take seconds to let go) and each
step is checked by reading the ``driver`` link back.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from runner.errors import GpuBindError, GpuError, GpuReleaseError
from runner.gpu.sysfs import VFIO_DRIVER, GpuUnit, Sysfs


@dataclass(frozen=True)
class Bound:
    """One function as it was before it was handed to vfio-pci."""

    address: str
    driver: str | None  # the driver to give it back to (None: leave it unbound)
    override: str | None  # its driver_override before ours

    def to_json(self) -> dict[str, str | None]:
        return {"address": self.address, "driver": self.driver, "override": self.override}

    @classmethod
    def from_json(cls, data: dict[str, str | None]) -> Bound:
        address = data["address"]
        if not isinstance(address, str):
            raise ValueError("bound function without an address")
        return cls(address, data.get("driver"), data.get("override"))


def _write(path: Path, value: str) -> None:
    # One write(2) on an existing attribute, as sysfs wants (O_TRUNC like a shell's `>`);
    # never create files.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


class VfioBinder:
    """Hands IOMMU groups to vfio-pci and back, under one sysfs root."""

    def __init__(self, sysfs: Sysfs, *, timeout_s: float = 10.0, poll_s: float = 0.005) -> None:
        self.sysfs = sysfs
        self.timeout_s = timeout_s
        self.poll_s = poll_s

    def plan(self, unit: GpuUnit) -> tuple[Bound, ...]:
        """Each function of ``unit`` with the driver and override it has now."""
        return tuple(
            Bound(fn.address, self.sysfs.driver_of(fn.address), self._override(fn.address))
            for fn in unit.functions
        )

    async def bind(self, plan: tuple[Bound, ...]) -> None:
        """Give every function of ``plan`` to vfio-pci; on failure, undo what was done.

        Raises GpuBindError (everything is back with the host) or GpuReleaseError
        (undoing failed too: the caller must quarantine the device).
        """
        if not (self.sysfs.drivers / VFIO_DRIVER).is_dir():
            raise GpuBindError(
                "the vfio-pci driver is not loaded: run `modprobe vfio-pci` and list it in"
                " /etc/modules-load.d/", device=plan[0].address if plan else None)
        done: list[Bound] = []
        try:
            for bound in plan:
                if bound.driver != VFIO_DRIVER:
                    await self._to_vfio(bound)
                done.append(bound)
        except BaseException as exc:
            done.append(bound)  # a half-moved function is undone too, even when cancelled
            await asyncio.shield(self.release(tuple(done), reset=False))
            if isinstance(exc, GpuError):
                raise GpuBindError(str(exc).removeprefix(f"gpu {exc.device}: "),
                                   device=exc.device) from exc
            raise

    async def release(self, plan: tuple[Bound, ...], *, reset: bool = True) -> None:
        """Reset each function and give it back to the driver it had.

        Every function is attempted; the first failure is raised as
        GpuReleaseError once all were tried.
        """
        failure: GpuError | None = None
        for bound in plan:
            try:
                if reset:
                    await self._reset(bound.address)
                await self._give_back(bound)
            except GpuError as exc:
                failure = failure or exc
        if failure is not None:
            raise GpuReleaseError(str(failure).removeprefix(f"gpu {failure.device}: "),
                                  device=failure.device) from failure

    async def _to_vfio(self, bound: Bound) -> None:
        address = bound.address
        dev = self.sysfs.device(address)
        await self._step(dev / "driver_override", VFIO_DRIVER, address, "set driver_override")
        current = self.sysfs.driver_of(address)
        if current is not None:
            await self._step(dev / "driver" / "unbind", address, address,
                             f"unbind from {current}")
            await self._until(address, None, f"host driver {current} did not let go of it"
                              " (in use by the host?)")
        await self._step(self.sysfs.drivers_probe, address, address, "probe")
        await self._until(address, VFIO_DRIVER, "vfio-pci did not take it")

    async def _give_back(self, bound: Bound) -> None:
        address = bound.address
        dev = self.sysfs.device(address)
        if bound.driver == VFIO_DRIVER:
            return  # it was the operator's vfio device before us; it stays so
        # Writing a newline clears an override.
        await self._step(dev / "driver_override", bound.override or "\n", address,
                         "restore driver_override")
        current = self.sysfs.driver_of(address)
        if current is not None and current != bound.driver:
            await self._step(dev / "driver" / "unbind", address, address,
                             f"unbind from {current}")
            await self._until(address, None, f"{current} did not let go of it")
        if bound.driver is not None and self.sysfs.driver_of(address) != bound.driver:
            await self._step(self.sysfs.drivers_probe, address, address, "probe")
            await self._until(address, bound.driver, f"{bound.driver} did not take it back")

    async def _reset(self, address: str) -> None:
        reset = self.sysfs.device(address) / "reset"
        if reset.exists():
            await self._step(reset, "1", address, "function reset")

    def _override(self, address: str) -> str | None:
        try:
            value = (self.sysfs.device(address) / "driver_override").read_text().strip()
        except FileNotFoundError:
            return None
        return None if value in ("", "(null)") else value

    async def _step(self, path: Path, value: str, address: str, what: str) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(_write, path, value), self.timeout_s)
        except TimeoutError:
            raise GpuError(f"{what}: no answer from the kernel in {self.timeout_s:g}s",
                           device=address) from None
        except OSError as exc:
            raise GpuError(f"{what} failed: {exc.strerror or exc}", device=address) from exc

    async def _until(self, address: str, driver: str | None, why: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while (now := self.sysfs.driver_of(address)) != driver:
            if time.monotonic() > deadline:
                raise GpuError(f"{why} within {self.timeout_s:g}s (driver: {now or 'none'})",
                               device=address)
            await asyncio.sleep(self.poll_s)
