"""How fast does a hot-plugged PCI device reach a snapshot-restored guest?

Stand-alone probe (no daemon, no agent): a busybox initramfs whose init waits
on the serial line for ``go <action>``, performs the action (nothing, power the
pciehp slot, or rescan the bus) and reports ``SEEN`` as soon as QEMU's ``edu``
device (1234:11e8) is in ``/sys/bus/pci/devices``. For each variant: boot a
template, snapshot it (file-backed RAM, ``x-ignore-shared``), then N times:
restore a clone, ``cont``, ``device_add edu``, send ``go``, time until SEEN.

    .venv/bin/python -m bench.gpu_plug_probe [--runs 5] [--variant NAME ...] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import stat
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, QMPClient

from runner.host import host_tsc_khz
from runner.images.initramfs import Entry, newc_archive, with_parents

KERNEL = Path("/var/cache/snapfleet/kernel-b8ff26cbee40a4af/vmlinux")
BUSYBOX = Path("/usr/bin/busybox")
MEMORY_MIB = 256

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo READY
while read cmd action want; do
  want=${want:-11e8}
  [ "$cmd" = go ] || continue
  cs=/sys/devices/system/clocksource/clocksource0/current_clocksource
  echo "ACT clock $(cat $cs) up $(cut -d' ' -f1 /proc/uptime)"
  case "$action" in
    power)
      # The agent's job: complete the slot power-on pciehp would do after 5 s.
      for slot in /sys/bus/pci/slots/*; do
        if echo 1 2>/dev/null > "$slot/power"; then echo "ACT power $slot ok"
        else echo "ACT power $slot failed"; fi
      done ;;
    rescan) echo 1 > /sys/bus/pci/rescan; echo "ACT rescan" ;;
  esac
  n=0
  while ! grep -qs 0x$want /sys/bus/pci/devices/*/device; do
    usleep 2000; n=$((n+1)); [ $n -gt 15000 ] && break
  done
  echo "ACT seen at up $(cut -d' ' -f1 /proc/uptime)"
  found=$(grep -ls 0x$want /sys/bus/pci/devices/*/device | head -1)
  if [ "$want" != 11e8 ]; then  # a big-BAR stand-in: show how its BARs were placed
    sleep 1; dmesg | grep -E "BAR|bridge window" | tail -8 | sed 's/^/ACT /'
  fi
  echo "SEEN $found"
done
"""


@dataclass(frozen=True)
class Variant:
    """One machine/guest combination to measure."""

    name: str
    machine: str  # -M value without memory-backend
    ports: tuple[str, ...]  # extra -device arguments (root ports)
    cmdline: str  # extra guest kernel arguments
    bus: str  # device_add bus
    action: str  # what the guest does after `go`: none | power | rescan


VARIANTS = {
    v.name: v
    for v in [
        # The baseline: pciehp waits out its attention-button delay.
        Variant("microvm-native", "microvm,pit=on,rtc=on,pcie=on",
                ("pcie-root-port,id=rp0,chassis=1,slot=1",), "pcie_ports=native", "rp0", "none"),
        # The guest completes the power-on itself right after the plug.
        Variant("microvm-native-power", "microvm,pit=on,rtc=on,pcie=on",
                ("pcie-root-port,id=rp0,chassis=1,slot=1",), "pcie_ports=native", "rp0", "power"),
        # No power controller: the device answers config cycles at once; the guest rescans.
        Variant("microvm-nopcc-rescan", "microvm,pit=on,rtc=on,pcie=on",
                ("pcie-root-port,id=rp0,chassis=1,slot=1,power_controller_present=off",),
                "pcie_ports=native", "rp0", "rescan"),
        # pciehp not bound at all (compat), no power controller, the guest rescans.
        Variant("microvm-compat-rescan", "microvm,pit=on,rtc=on,pcie=on",
                ("pcie-root-port,id=rp0,chassis=1,slot=1,power_controller_present=off",),
                "pcie_ports=compat", "rp0", "rescan"),
        # q35: QEMU 7.2 defaults to ACPI hotplug on root ports; the guest's acpiphp reacts.
        Variant("q35-acpi", "q35", ("pcie-root-port,id=rp0,chassis=1,slot=1",), "", "rp0",
                "none"),
        # i440fx: ACPI hotplug straight onto the root bus (conventional PCI).
        Variant("pc-acpi", "pc", (), "", "pci.0", "none"),
    ]
}


def initramfs(path: Path) -> None:
    entries = with_parents([
        Entry("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes()),
        Entry("init", stat.S_IFREG | 0o755, INIT.encode()),
        Entry("proc", stat.S_IFDIR | 0o755), Entry("sys", stat.S_IFDIR | 0o755),
        Entry("dev", stat.S_IFDIR | 0o755), Entry("tmp", stat.S_IFDIR | 0o755),
    ])
    path.write_bytes(newc_archive(entries))


def argv(v: Variant, work: Path, *, clone: bool) -> list[str]:
    khz = host_tsc_khz()
    cmdline = f"console=ttyS0 panic=-1 {v.cmdline}" + (f" tsc_early_khz={khz}" if khz else "")
    share = "off" if clone else "on"
    args = [
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
        "-object", f"memory-backend-file,id=mem,size={MEMORY_MIB}M,mem-path={work / 'mem'},"
        f"share={share}",
        "-M", f"{v.machine},memory-backend=mem", "-m", f"{MEMORY_MIB}M", "-smp", "1",
        "-accel", "tcg,thread=multi,tb-size=64", "-cpu", "max",
        "-kernel", str(KERNEL), "-initrd", str(work / "initrd"), "-append", cmdline,
        "-chardev", f"socket,id=ser,path={work / 'serial'},server=on,wait=off",
        "-serial", "chardev:ser",
        "-qmp", f"unix:{work / 'qmp'},server=on,wait=off", "-no-reboot",
    ]
    for port in v.ports:
        args += ["-device", port]
    if clone:
        args += ["-incoming", "defer"]
    return args


class Guest:
    """A QEMU process, its QMP client and its serial line."""

    def __init__(self, proc: asyncio.subprocess.Process, qmp: QMPClient,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.proc, self.qmp, self.reader, self.writer = proc, qmp, reader, writer
        self.lines: list[str] = []

    @classmethod
    async def start(cls, v: Variant, work: Path, *, clone: bool) -> Guest:
        for name in ("qmp", "serial"):
            (work / name).unlink(missing_ok=True)
        proc = await asyncio.create_subprocess_exec(*argv(v, work, clone=clone),
                                                    stderr=asyncio.subprocess.PIPE)
        for _ in range(500):
            if (work / "qmp").exists() and (work / "serial").exists():
                break
            await asyncio.sleep(0.005)
        qmp = QMPClient("probe")
        for attempt in range(100):  # the socket file exists a moment before QEMU listens
            try:
                await qmp.connect(str(work / "qmp"))
                reader, writer = await asyncio.open_unix_connection(str(work / "serial"))
                break
            except (OSError, ConnectError):
                if attempt == 99:
                    raise
                await asyncio.sleep(0.01)
        return cls(proc, qmp, reader, writer)

    async def wait_line(self, prefix: str, timeout: float) -> str:
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.reader.readline()
                if not raw:
                    raise RuntimeError("serial closed:\n" + "\n".join(self.lines[-30:]))
                line = raw.decode(errors="replace").strip()
                self.lines.append(line)
                if line.startswith(prefix):
                    return line

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp.execute("quit")
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        self.writer.close()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()


async def wait_migration(qmp: QMPClient) -> None:
    while True:
        status: Any = await qmp.execute("query-migrate")
        if status.get("status") == "completed":
            return
        if status.get("status") == "failed":
            raise RuntimeError(f"migration failed: {status}")
        await asyncio.sleep(0.005)


async def template(v: Variant, work: Path) -> float:
    started = time.monotonic()
    guest = await Guest.start(v, work, clone=False)
    try:
        await guest.wait_line("READY", 300)
        booted = time.monotonic() - started
        await guest.qmp.execute("migrate-set-capabilities", {
            "capabilities": [{"capability": "x-ignore-shared", "state": True}]})
        await guest.qmp.execute("stop")
        await guest.qmp.execute("migrate", {"uri": f"exec:cat > {work / 'state'}"})
        await wait_migration(guest.qmp)
    finally:
        await guest.stop()
    return booted


async def cold_run(v: Variant, work: Path) -> dict[str, Any]:
    """Cold boot, then plug (no snapshot): the baseline the issue measured."""
    started = time.monotonic()
    guest = await Guest.start(v, work, clone=False)
    try:
        await guest.wait_line("READY", 300)
        await asyncio.sleep(1.0)
        booted = time.monotonic()
        await guest.qmp.execute("device_add", {"driver": "edu", "bus": v.bus, "id": "gpu0"})
        plugged = time.monotonic()
        guest.writer.write(f"go {v.action}\n".encode())
        await guest.writer.drain()
        seen = await guest.wait_line("SEEN", 120)
        now = time.monotonic()
        return {
            "device": seen.removeprefix("SEEN").strip() or None,
            "boot_ms": (booted - started) * 1000,
            "plug_to_seen_ms": (now - plugged) * 1000,
            "guest": [ln for ln in guest.lines if "pciehp" in ln or ln.startswith("ACT")
                      or "acpiphp" in ln],
        }
    finally:
        await guest.stop()


async def one_run(v: Variant, work: Path, before_cont: bool) -> dict[str, Any]:
    started = time.monotonic()
    guest = await Guest.start(v, work, clone=True)
    try:
        await guest.qmp.execute("migrate-set-capabilities", {
            "capabilities": [{"capability": "x-ignore-shared", "state": True}]})
        await guest.qmp.execute("migrate-incoming", {"uri": f"exec:cat {work / 'state'}"})
        await wait_migration(guest.qmp)
        if before_cont:  # plug into the paused clone: the guest meets the device on resume
            plugged = time.monotonic()
            await guest.qmp.execute("device_add", {"driver": "edu", "bus": v.bus, "id": "gpu0"})
            await guest.qmp.execute("cont")
            resumed = time.monotonic()
        else:
            await guest.qmp.execute("cont")
            resumed = time.monotonic()
            plugged = time.monotonic()
            await guest.qmp.execute("device_add", {"driver": "edu", "bus": v.bus, "id": "gpu0"})
        guest.writer.write(f"go {v.action}\n".encode())
        await guest.writer.drain()
        seen = await guest.wait_line("SEEN", 120)
        now = time.monotonic()
        return {
            "device": seen.removeprefix("SEEN").strip() or None,
            "restore_ms": (resumed - started) * 1000,
            "plug_to_seen_ms": (now - plugged) * 1000,
            "visible_after_restore_ms": (now - started) * 1000,
            "guest": [ln for ln in guest.lines if "pciehp" in ln or ln.startswith("ACT")
                      or "acpiphp" in ln],
        }
    finally:
        await guest.stop()


def summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return {"p50": round(statistics.median(values), 1), "p95": round(p95, 1), "n": len(values)}


async def probe(names: list[str], runs: int, log: Any, before_cont: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    root = Path(tempfile.mkdtemp(prefix="sf-gpu-probe-", dir="/tmp"))
    try:
        initramfs(root / "initrd")
        for name in names:
            v = VARIANTS[name]
            work = root / name
            work.mkdir()
            shutil.copy(root / "initrd", work / "initrd")
            boot_s = await template(v, work)
            print(f"{name}: template booted in {boot_s:.1f}s", file=log)
            samples = []
            for _ in range(runs):
                sample = await one_run(v, work, before_cont)
                print(f"  {name}: {sample}", file=log)
                samples.append(sample)
            seen = [s for s in samples if s["device"]]
            results[name] = {
                "cold_boot_s": round(boot_s, 2),
                "seen": f"{len(seen)}/{len(samples)}",
                "plug_to_seen_ms": summary([s["plug_to_seen_ms"] for s in samples]),
                "visible_after_restore_ms": summary(
                    [s["visible_after_restore_ms"] for s in samples]),
                "restore_ms": summary([s["restore_ms"] for s in samples]),
            }
            (work / "mem").unlink(missing_ok=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--before-cont", action="store_true",
                        help="device_add while the restored clone is still paused")
    args = parser.parse_args()
    names = args.variant or list(VARIANTS)
    results = asyncio.run(probe(names, args.runs, sys.stderr, args.before_cont))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, r in results.items():
            print(f"{name:24} seen {r['seen']:5} plug->seen p50 {r['plug_to_seen_ms']['p50']:8.1f}"
                  f" ms p95 {r['plug_to_seen_ms']['p95']:8.1f} ms; restore->seen p50"
                  f" {r['visible_after_restore_ms']['p50']:8.1f} ms")


if __name__ == "__main__":
    main()
