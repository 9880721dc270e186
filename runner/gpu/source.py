"""Device sources: where the devices a VM gets come from.

The allocator and the VM side see only ``DeviceSource``: the units it can
hand out, how to take one from the host and give it back, and the QEMU
``device_add`` arguments that attach it. ``VfioSource`` passes host devices
through vfio-pci; ``EduSource`` hands out QEMU's emulated ``edu`` device
(1234:11e8), so tests and benchmarks exercise the same path with no hardware.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from runner.errors import GpuError
from runner.gpu.binding import Bound, VfioBinder
from runner.gpu.config import GpuSettings
from runner.gpu.sysfs import Assessment, GpuUnit, PciFunction, Sysfs, assess, scan, usable_units

DeviceArgs = dict[str, str]
EDU_MODEL = "1234:11e8"


class DeviceSource(Protocol):
    """Hands out units (a device and its group) and says how QEMU attaches them."""

    kind: str
    guest_driver: bool
    """Whether the guest must bind a driver to each function before a job may use it
    (a hot-plug is acknowledged only then)."""

    def units(self) -> Sequence[GpuUnit]:
        """Every unit this source may hand out (healthy or not; the allocator decides)."""
        ...

    def plan(self, unit: GpuUnit) -> tuple[Bound, ...]:
        """What ``claim`` will change, recorded before it does so a crash can undo it."""
        ...

    async def claim(self, plan: tuple[Bound, ...]) -> None:
        """Take the unit from the host (GpuBindError; GpuReleaseError if undoing failed)."""
        ...

    async def give_back(self, plan: tuple[Bound, ...]) -> None:
        """Reset the unit and return it to the host (GpuReleaseError: quarantine it)."""
        ...

    def device_args(self, unit: GpuUnit, buses: Sequence[str], prefix: str) -> list[DeviceArgs]:
        """QMP ``device_add`` arguments, in plug order, one root port (bus) per card."""
        ...


def slots(unit: GpuUnit) -> list[str]:
    """The cards (domain:bus:device) of ``unit``, in plug order: one root port each."""
    seen: list[str] = []
    for fn in unit.functions:
        if fn.slot not in seen:
            seen.append(fn.slot)
    return seen


def _bus_of(unit: GpuUnit, buses: Sequence[str]) -> dict[str, str]:
    cards = slots(unit)
    if len(buses) < len(cards):
        raise GpuError(f"needs {len(cards)} root ports, got {len(buses)}", device=unit.id)
    return dict(zip(cards, buses, strict=False))


class VfioSource:
    """Host devices passed through with vfio-pci."""

    kind = "vfio"
    guest_driver = True

    def __init__(self, settings: GpuSettings, sysfs: Sysfs, binder: VfioBinder) -> None:
        self.settings = settings
        self.sysfs = sysfs
        self.binder = binder
        self.assessments: list[Assessment] = []
        self._units: list[GpuUnit] = []
        self.refresh()

    def refresh(self) -> None:
        """Read sysfs again (devices can appear, or lose their driver)."""
        self.assessments = assess(scan(self.sysfs), self.settings)
        self._units = usable_units(self.assessments)

    def units(self) -> Sequence[GpuUnit]:
        return self._units

    def plan(self, unit: GpuUnit) -> tuple[Bound, ...]:
        return self.binder.plan(unit)

    async def claim(self, plan: tuple[Bound, ...]) -> None:
        await self.binder.bind(plan)

    async def give_back(self, plan: tuple[Bound, ...]) -> None:
        await self.binder.release(plan)

    def device_args(self, unit: GpuUnit, buses: Sequence[str], prefix: str) -> list[DeviceArgs]:
        bus_of = _bus_of(unit, buses)
        multi = {s for s in bus_of if sum(f.slot == s for f in unit.functions) > 1}
        args = []
        for index, fn in enumerate(unit.functions):
            arg = {"driver": "vfio-pci", "host": fn.address, "bus": bus_of[fn.slot],
                   "addr": f"0.{fn.function}", "id": f"{prefix}-{index}"}
            if fn.function == 0 and fn.slot in multi:
                arg["multifunction"] = "on"
            args.append(arg)
        return args


class EduSource:
    """QEMU's emulated ``edu`` test device: no hardware, nothing to bind."""

    kind = "edu"
    guest_driver = False  # Linux has no driver for it: enumerated is all it gets

    def __init__(self, count: int) -> None:
        self._units = [
            GpuUnit(fn, (fn,))
            for fn in (PciFunction(f"edu{i}", "1234", "11e8", "00ff00", None, None, True)
                       for i in range(count))
        ]

    def units(self) -> Sequence[GpuUnit]:
        return self._units

    def plan(self, unit: GpuUnit) -> tuple[Bound, ...]:
        return ()

    async def claim(self, plan: tuple[Bound, ...]) -> None:
        return None

    async def give_back(self, plan: tuple[Bound, ...]) -> None:
        return None

    def device_args(self, unit: GpuUnit, buses: Sequence[str], prefix: str) -> list[DeviceArgs]:
        return [{"driver": "edu", "bus": _bus_of(unit, buses)[unit.primary.slot],
                 "id": f"{prefix}-0"}]


def device_option(args: DeviceArgs) -> str:
    """``device_add`` arguments as a ``-device`` option (cold boot): driver first."""
    rest = ",".join(f"{k}={v}" for k, v in args.items() if k != "driver")
    return f"{args['driver']},{rest}"


def make_source(settings: GpuSettings, sysfs: Sysfs) -> DeviceSource:
    """The source ``settings`` asks for."""
    if settings.source == "edu":
        return EduSource(settings.edu_devices)
    return VfioSource(settings, sysfs, VfioBinder(sysfs, timeout_s=settings.bind_timeout_s))
