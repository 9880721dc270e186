"""What ``snapfleet doctor`` says about GPU passthrough on this host.

Every input (sysfs root, kernel command line, modules directory, the memlock
limit) is a parameter so the checks run against temporary trees in tests.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

from runner.gpu.config import GpuSettings
from runner.gpu.sysfs import Sysfs, assess, scan

_IOMMU_FLAGS = ("intel_iommu=on", "amd_iommu=on", "amd_iommu=force_isolation", "iommu=pt",
                "iommu.passthrough=1")
# A VM's memory outside its guest RAM that VFIO pins too (ROMs, QEMU's own DMA buffers).
MEMLOCK_MARGIN_MIB = 64


@dataclass(frozen=True)
class GpuCheck:
    """One doctor line: a name, whether it passed, and what to do about it."""

    name: str
    ok: bool
    detail: str


def gpu_checks(
    settings: GpuSettings,
    *,
    largest_gpu_vm_mib: int,
    sysfs: Sysfs | None = None,
    cmdline: Path = Path("/proc/cmdline"),
    modules_dir: Path | None = None,
    memlock_bytes: int | None = None,
) -> list[GpuCheck]:
    """IOMMU, VFIO modules, the memlock limit, and a verdict on each candidate device.

    ``largest_gpu_vm_mib`` is the most guest memory a GPU profile asks for (0 when
    no profile asks for a GPU): VFIO pins all of it.
    """
    sysfs = sysfs or Sysfs()
    if settings.source == "edu":
        return [GpuCheck("gpu", True, f"gpu.source = 'edu': {settings.edu_devices} emulated"
                         " test devices, no host GPU is used")]
    modules_dir = modules_dir or Path("/lib/modules") / os.uname().release
    if memlock_bytes is None:
        memlock_bytes = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    checks = [_iommu(sysfs, cmdline), _vfio_module(sysfs, modules_dir),
              _memlock(memlock_bytes, largest_gpu_vm_mib)]
    checks += _devices(settings, sysfs)
    return checks


def _iommu(sysfs: Sysfs, cmdline: Path) -> GpuCheck:
    try:
        args = cmdline.read_text().split()
    except OSError:
        args = []
    flags = [a for a in args if a in _IOMMU_FLAGS or a.startswith(("intel_iommu=", "amd_iommu="))]
    said = " ".join(flags) or "no intel_iommu=/amd_iommu= flag"
    if sysfs.iommu_on():
        count = sum(1 for _ in sysfs.iommu_groups.iterdir())
        return GpuCheck("iommu", True, f"IOMMU on: {count} groups (kernel command line: {said})")
    return GpuCheck("iommu", False, (
        f"IOMMU off: {sysfs.iommu_groups} is empty or missing ({said} on the kernel command"
        " line), so no device can be passed to a VM. Enable VT-d/AMD-Vi in the firmware and"
        " boot with intel_iommu=on (Intel) or amd_iommu=on (AMD), plus iommu=pt"))


def _vfio_module(sysfs: Sysfs, modules_dir: Path) -> GpuCheck:
    if (sysfs.drivers / "vfio-pci").is_dir():
        return GpuCheck("vfio", True, "vfio-pci is loaded")
    for name in ("modules.builtin", "modules.dep"):
        try:
            text = (modules_dir / name).read_text()
        except OSError:
            continue
        if "/vfio-pci.ko" in text or "/vfio_pci.ko" in text:
            how = "built in" if name == "modules.builtin" else "installed, not loaded"
            return GpuCheck("vfio", True, f"vfio-pci is {how} (`modprobe vfio-pci` loads it)")
    if not (modules_dir / "modules.dep").exists():
        return GpuCheck("vfio", False, f"vfio-pci is not loaded and this kernel has no module"
                        f" tree at {modules_dir}: it cannot be loaded")
    return GpuCheck("vfio", False, "vfio-pci is neither loaded nor installed for this kernel")


def _memlock(limit: int, need_mib: int) -> GpuCheck:
    have = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit // 2**20} MiB"
    if need_mib == 0:
        return GpuCheck("memlock", True, f"LimitMEMLOCK {have} (no profile asks for a GPU)")
    need = (need_mib + MEMLOCK_MARGIN_MIB) * 2**20
    if limit == resource.RLIM_INFINITY or limit >= need:
        return GpuCheck("memlock", True, f"LimitMEMLOCK {have} covers the largest GPU VM"
                        f" ({need_mib} MiB, all pinned by VFIO)")
    return GpuCheck("memlock", False, (
        f"LimitMEMLOCK {have} is below the {need // 2**20} MiB a GPU VM pins (its"
        f" {need_mib} MiB of RAM): set LimitMEMLOCK=infinity in snapfleet.service"))


def _devices(settings: GpuSettings, sysfs: Sysfs) -> list[GpuCheck]:
    functions = scan(sysfs)
    if settings.devices == []:
        # Nothing configured: still say what this host has, as `auto` would see it.
        found = assess(functions, settings.model_copy(update={"devices": "auto"}))
        if not found:
            return [GpuCheck("gpu", True, f"gpu.devices is empty, and this host has no display"
                             f" (0x03) or accelerator (0x12) PCI device ({len(functions)} PCI"
                             " functions, none a GPU)")]
        return [GpuCheck(f"gpu {a.address}", a.unit is not None,
                         f"{a.model}: {a.reason} (not configured: list it in gpu.devices)")
                for a in found]
    assessments = assess(functions, settings)
    if not assessments:
        return [GpuCheck("gpu", False, "gpu.devices = 'auto' found no display (0x03) or"
                         f" accelerator (0x12) device among {len(functions)} PCI functions")]
    return [GpuCheck(f"gpu {a.address}", a.unit is not None, f"{a.model or '?'}: {a.reason}")
            for a in assessments]
