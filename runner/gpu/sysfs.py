"""PCI devices and IOMMU groups as sysfs shows them, and which can be passed.

``scan`` reads every PCI function under a sysfs root (``/sys`` on a host, a
temporary tree in tests); ``assess`` is the pure decision of which display or
accelerator devices can be handed to a VM, as whole IOMMU groups, and why the
others cannot.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner.gpu.config import GpuSettings

VFIO_DRIVER = "vfio-pci"
# Drivers that hold a device for passthrough rather than use it.
PASSTHROUGH_DRIVERS = frozenset({VFIO_DRIVER, "pci-stub"})

_CLASS_NAMES = {
    "0300": "VGA controller",
    "0302": "3D controller",
    "0380": "display controller",
    "0403": "audio device",
    "0200": "Ethernet controller",
    "0106": "SATA controller",
    "0108": "NVMe controller",
    "0c03": "USB controller",
    "0c80": "serial bus controller",
    "0600": "host bridge",
    "0604": "PCI bridge",
    "1200": "processing accelerator",
}


class Sysfs:
    """Paths under one sysfs root."""

    def __init__(self, root: Path = Path("/sys")) -> None:
        self.root = root
        self.devices = root / "bus/pci/devices"
        self.drivers = root / "bus/pci/drivers"
        self.drivers_probe = root / "bus/pci/drivers_probe"
        self.iommu_groups = root / "kernel/iommu_groups"

    def device(self, address: str) -> Path:
        return self.devices / address

    def driver_of(self, address: str) -> str | None:
        """The name of the driver bound to ``address``, or None."""
        link = self.device(address) / "driver"
        try:
            return os.path.basename(os.readlink(link))
        except FileNotFoundError:
            return None

    def iommu_on(self) -> bool:
        return self.iommu_groups.is_dir() and any(self.iommu_groups.iterdir())


@dataclass(frozen=True)
class PciFunction:
    """One PCI function as sysfs describes it."""

    address: str  # 0000:01:00.0
    vendor: str  # 10de
    device: str  # 2684
    class_code: str  # 030000
    driver: str | None
    iommu_group: str | None
    can_reset: bool
    boot_vga: bool = False

    @property
    def model(self) -> str:
        return f"{self.vendor}:{self.device}"

    @property
    def slot(self) -> str:
        """Domain, bus and device: the functions of one physical card share it."""
        return self.address.rsplit(".", 1)[0]

    @property
    def function(self) -> int:
        return int(self.address.rsplit(".", 1)[1])

    @property
    def is_bridge(self) -> bool:
        # VFIO leaves bridges in a group with their own driver (pcieport).
        return self.class_code.startswith("06")

    def describe(self) -> str:
        kind = _CLASS_NAMES.get(self.class_code[:4], f"class 0x{self.class_code[:4]}")
        return f"{self.address} ({kind} {self.model}, driver {self.driver or 'none'})"


@dataclass(frozen=True)
class GpuUnit:
    """What one lease hands out: a GPU and every other function of its IOMMU group."""

    primary: PciFunction
    functions: tuple[PciFunction, ...]  # to pass to the VM, function 0 of each card last

    @property
    def id(self) -> str:
        return self.primary.address

    @property
    def model(self) -> str:
        return self.primary.model

    @property
    def group(self) -> str | None:
        return self.primary.iommu_group


@dataclass(frozen=True)
class Assessment:
    """One candidate device: the unit it would be handed out as, or why it cannot."""

    address: str
    model: str | None
    unit: GpuUnit | None
    reason: str


def _read(path: Path) -> str:
    return path.read_text().strip().lower().removeprefix("0x")


def scan(sysfs: Sysfs) -> list[PciFunction]:
    """Every PCI function under ``sysfs``, sorted by address."""
    if not sysfs.devices.is_dir():
        return []
    found = []
    for entry in sorted(sysfs.devices.iterdir()):
        group_link = entry / "iommu_group"
        group = os.path.basename(os.readlink(group_link)) if group_link.is_symlink() else None
        boot_vga = entry / "boot_vga"
        found.append(PciFunction(
            address=entry.name,
            vendor=_read(entry / "vendor"),
            device=_read(entry / "device"),
            class_code=_read(entry / "class"),
            driver=sysfs.driver_of(entry.name),
            iommu_group=group,
            can_reset=(entry / "reset").exists(),
            boot_vga=boot_vga.exists() and _read(boot_vga) == "1",
        ))
    return found


def _is_candidate(fn: PciFunction, settings: GpuSettings) -> bool:
    if settings.devices == "auto":
        return (any(fn.class_code.startswith(c) for c in settings.classes)
                and (not settings.vendors or fn.vendor in settings.vendors))
    return fn.address in settings.devices


def _pass_order(functions: Iterable[PciFunction]) -> tuple[PciFunction, ...]:
    # QEMU announces a multifunction card once its function 0 arrives: plug it last.
    return tuple(sorted(functions, key=lambda f: (f.slot, f.function == 0, f.function)))


def _judge(fn: PciFunction, group: Sequence[PciFunction], auto: bool) -> str | None:
    """Why ``fn`` (with ``group``, the other members of its IOMMU group) cannot be passed."""
    if fn.iommu_group is None:
        return ("no IOMMU group: the IOMMU is off (enable VT-d/AMD-Vi in the firmware and add"
                " intel_iommu=on or amd_iommu=on iommu=pt to the kernel command line)")
    if fn.boot_vga and fn.driver not in PASSTHROUGH_DRIVERS and fn.driver is not None:
        return f"is the host's boot display (driver {fn.driver})"
    if not fn.can_reset:
        return "has no reset method, so one job's state could reach the next"
    for other in group:
        if other.is_bridge or other.slot == fn.slot:
            continue
        return (f"IOMMU group {fn.iommu_group} also holds {other.describe()}, which must stay"
                " with the host (the whole group goes to the VM or nothing does)")
    if auto:
        for member in (fn, *group):
            if member.driver is not None and member.driver not in PASSTHROUGH_DRIVERS \
                    and not member.is_bridge:
                return (f"{member.address} is bound to host driver {member.driver}; `auto`"
                        " never takes a device from the host (list it in gpu.devices)")
    return None


def assess(functions: Sequence[PciFunction], settings: GpuSettings) -> list[Assessment]:
    """Each candidate device, usable (with its unit) or not (with the reason).

    A candidate is a display (0x03xx) or accelerator (0x12xx) function when
    ``devices = "auto"``, or a listed address. Its unit is every non-bridge
    function of its IOMMU group; functions of other cards in the group make
    the group unusable, since VFIO hands over a group whole. A group holding
    two candidates becomes one unit, named by its first.
    """
    by_address = {f.address: f for f in functions}
    auto = settings.devices == "auto"
    results: list[Assessment] = []
    if not auto:
        for address in settings.devices:
            if address not in by_address:
                results.append(Assessment(address, None, None, "not present on this host"))
    taken: set[str] = set()
    for fn in functions:
        if not _is_candidate(fn, settings):
            continue
        group = [f for f in functions
                 if fn.iommu_group is not None and f.iommu_group == fn.iommu_group and f != fn]
        if fn.iommu_group in taken:
            results.append(Assessment(fn.address, fn.model, None,
                                      f"handed out with the rest of IOMMU group {fn.iommu_group}"))
            continue
        reason = _judge(fn, group, auto)
        if reason is not None:
            results.append(Assessment(fn.address, fn.model, None, reason))
            continue
        assert fn.iommu_group is not None
        taken.add(fn.iommu_group)
        passed = _pass_order(f for f in (fn, *group) if not f.is_bridge)
        companions = [f.address for f in passed if f != fn]
        why = "usable" + (f" with {', '.join(companions)}" if companions else "")
        results.append(Assessment(fn.address, fn.model, GpuUnit(fn, passed),
                                  f"{why} (IOMMU group {fn.iommu_group})"))
    return results


def usable_units(assessments: Iterable[Assessment]) -> list[GpuUnit]:
    return [a.unit for a in assessments if a.unit is not None]
