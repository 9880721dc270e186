"""What this host can do: which accelerator really works, which tools exist.

``resolve_accel`` is what every VM start uses; ``doctor`` runs the checks that
``snapfleet doctor`` prints.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from runner.config import Accel, Settings
from runner.errors import HostError
from runner.gpu.doctor import gpu_checks

ResolvedAccel = Literal["kvm", "tcg"]

PVM_MODULE = Path("/sys/module/kvm_pvm")
KVM_DEVICE = Path("/dev/kvm")


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator a VM will use and why."""

    accel: ResolvedAccel
    cpu: str
    reason: str


def resolve_accel(
    requested: Accel, *, kvm_device: Path = KVM_DEVICE, pvm_module: Path = PVM_MODULE
) -> AccelChoice:
    """Pick KVM or TCG.

    PVM (``kvm_pvm``) exposes /dev/kvm but hangs a stock guest kernel with no
    output, so ``auto`` never picks it and an explicit ``kvm`` is refused there.
    """
    kvm_usable = kvm_device.exists() and os.access(kvm_device, os.R_OK | os.W_OK)
    is_pvm = pvm_module.exists()
    if requested == "tcg":
        return AccelChoice("tcg", "max", "configured")
    if requested == "kvm":
        if not kvm_usable:
            raise HostError(f"vm.accel = 'kvm' but {kvm_device} is missing or not accessible")
        if is_pvm:
            raise HostError(
                "vm.accel = 'kvm' but this host's KVM is PVM (kvm_pvm), which cannot boot a"
                " stock guest kernel; use accel = 'auto' or 'tcg'"
            )
        return AccelChoice("kvm", "host", "configured")
    if kvm_usable and not is_pvm:
        return AccelChoice("kvm", "host", f"{kvm_device} is usable")
    why = "KVM is PVM (kvm_pvm)" if is_pvm else f"{kvm_device} is not usable"
    return AccelChoice("tcg", "max", f"{why}; using TCG software emulation")


async def qemu_version(binary: str) -> str:
    """The QEMU version string, e.g. ``7.2.22``; HostError when QEMU is missing."""
    path = shutil.which(binary)
    if path is None:
        raise HostError(f"{binary} not found; install the qemu-system-x86 package")
    proc = await asyncio.create_subprocess_exec(
        path, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    match = re.search(r"version (\d+\.\d+\.\d+)", out.decode(errors="replace"))
    if proc.returncode != 0 or match is None:
        raise HostError(f"{binary} --version failed: {out.decode(errors='replace')[-200:]}")
    return match.group(1)


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host TSC frequency in kHz, when the CPU has a constant TSC.

    Under TCG the guest's TSC is the host's, so telling the guest kernel its
    frequency (``tsc_early_khz``) spares it the PIT calibration that fails on a
    loaded host and leaves the guest hanging at boot.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    if mhz is None or flags is None or "constant_tsc" not in flags.group(1).split():
        return None
    return round(float(mhz.group(1)) * 1000)


@dataclass(frozen=True)
class Check:
    """One line of ``snapfleet doctor``."""

    name: str
    ok: bool
    detail: str
    required: bool = True


async def doctor(settings: Settings) -> list[Check]:
    """Check the host for everything Snapfleet needs."""
    checks: list[Check] = []
    try:
        version = await qemu_version(settings.vm.qemu_binary)
        checks.append(Check("qemu", True, f"{settings.vm.qemu_binary} {version}"))
    except HostError as exc:
        checks.append(Check("qemu", False, str(exc)))
    img = shutil.which(settings.vm.qemu_img_binary)
    checks.append(Check("qemu-img", img is not None, img or "install the qemu-utils package"))
    try:
        choice = resolve_accel(settings.vm.accel)
        checks.append(Check("accelerator", True, f"{choice.accel} ({choice.reason})"))
    except HostError as exc:
        checks.append(Check("accelerator", False, str(exc)))
    checks.append(Check("root", os.geteuid() == 0, "namespaces, taps and NAT need root"))
    tun = Path("/dev/net/tun")
    checks.append(Check("tun", tun.exists(), str(tun) if tun.exists() else f"{tun} missing"))
    nft = shutil.which("nft")
    checks.append(Check("nftables", nft is not None, nft or "install the nftables package"))
    checks.append(_disk_check(settings.paths.cache_dir))
    checks.append(_dns_check(settings))
    checks += _gpu_checks(settings)
    return checks


def _dns_check(settings: Settings) -> Check:
    from runner.net.dns import host_resolvers

    if not settings.net.enabled:
        return Check("dns", True, "networking off", required=False)
    if settings.net.dns is not None:
        servers = ", ".join(map(str, settings.net.dns))
        return Check("dns", bool(servers), servers or "net.dns = [] (no resolver)", required=False)
    found = host_resolvers()
    if found.nameservers:
        servers = ", ".join(map(str, found.nameservers))
        return Check("dns", True, f"guests use {servers} (from {found.source})", required=False)
    why = "; ".join(found.skipped) or f"no nameserver in {found.source}"
    detail = f"guests would have no resolver ({why}); set net.dns"
    return Check("dns", False, detail, required=False)


def _disk_check(path: Path, need_gib: float = 5.0) -> Check:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    return Check(
        "disk", free >= need_gib, f"{free:.1f} GiB free at {probe} (images need ~{need_gib} GiB)"
    )


def _gpu_checks(settings: Settings) -> list[Check]:
    """GPU lines: failures only count when this host is configured to hand out GPUs."""
    wanting = [p.memory_mib for p in settings.profiles.values() if p.gpus]
    wanted = bool(settings.gpu.devices or settings.gpu.edu_devices or wanting)
    found = gpu_checks(settings.gpu, largest_gpu_vm_mib=max(wanting, default=0))
    return [Check(c.name, c.ok, c.detail, required=wanted) for c in found]
