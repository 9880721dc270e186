"""Sysfs-like trees in a temporary directory, and a tiny kernel that answers writes.

The layout follows a real host's: device directories under ``devices/``,
``bus/pci/devices/<addr>`` symlinks to them, ``driver`` and ``iommu_group``
symlinks, ``kernel/iommu_groups/<n>/devices/``. The attribute files the kernel
acts on (``drivers_probe``, each driver's ``bind``/``unbind``, each device's
``reset``) are FIFOs that a thread reads, reacting as the PCI core would:
moving the ``driver`` link per ``driver_override``, or refusing to when a test
says the hardware misbehaves.
"""

from __future__ import annotations

import os
import re
import selectors
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
DRIVERS = ("vfio-pci", "nvidia", "snd_hda_intel", "pcieport", "xhci_hcd", "igb", "nvme",
           "amdgpu")


@dataclass
class Dev:
    address: str
    vendor: str
    device: str
    cls: str
    native: str | None  # the driver the PCI core binds when nothing overrides it
    group: str | None
    reset: bool = True


class FakeHost:
    """A sysfs tree and the thread that plays the kernel for it."""

    def __init__(self, root: Path, devs: list[Dev], *, iommu: bool = True,
                 vfio_loaded: bool = True) -> None:
        self.root = root
        self.devs = {d.address: d for d in devs}
        self.stuck: set[str] = set()  # host driver never lets go (unbind does nothing)
        self.refuse: set[str] = set()  # probe binds nothing (driver fails to take it back)
        self.resets: Counter[str] = Counter()
        self.bus = root / "bus/pci"
        (self.bus / "devices").mkdir(parents=True)
        for name in DRIVERS:
            if name == "vfio-pci" and not vfio_loaded:
                continue
            (self.bus / "drivers" / name).mkdir(parents=True)
            for attr in ("bind", "unbind"):
                os.mkfifo(self.bus / "drivers" / name / attr)
        os.mkfifo(self.bus / "drivers_probe")
        if iommu:
            (root / "kernel/iommu_groups").mkdir(parents=True)
        for d in devs:
            self._add(d, iommu)
        self._fds: dict[int, Path] = {}
        self._keep: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _add(self, d: Dev, iommu: bool) -> None:
        path = self.root / "devices/pci0000:00" / d.address
        path.mkdir(parents=True)
        (path / "vendor").write_text(f"0x{d.vendor}\n")
        (path / "device").write_text(f"0x{d.device}\n")
        (path / "class").write_text(f"0x{d.cls}\n")
        (path / "driver_override").write_text("(null)\n")
        if d.reset:
            os.mkfifo(path / "reset")
        (self.bus / "devices" / d.address).symlink_to(path)
        if d.native is not None:
            self._link(d.address, d.native)
        if iommu and d.group is not None:
            group = self.root / "kernel/iommu_groups" / d.group / "devices"
            group.mkdir(parents=True, exist_ok=True)
            (group / d.address).symlink_to(path)
            (path / "iommu_group").symlink_to(group.parent)

    # -- what tests read and arrange

    def dev(self, address: str) -> Path:
        return self.bus / "devices" / address

    def driver(self, address: str) -> str | None:
        link = self.dev(address) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def override(self, address: str) -> str:
        return (self.dev(address) / "driver_override").read_text().strip()

    def bind_native(self, address: str, driver: str | None) -> None:
        (self.dev(address) / "driver").unlink(missing_ok=True)
        if driver is not None:
            self._link(address, driver)

    def break_reset(self, address: str) -> None:
        """The function's reset fails (every write returns ENOSPC, like a real EIO)."""
        reset = self.dev(address) / "reset"
        reset.unlink()
        reset.symlink_to("/dev/full")

    # -- the kernel

    def __enter__(self) -> FakeHost:
        fifos = [self.bus / "drivers_probe"]
        fifos += [p for p in (self.bus / "drivers").glob("*/*") if p.name in ("bind", "unbind")]
        fifos += [self.dev(a) / "reset" for a, d in self.devs.items() if d.reset]
        self._sel = selectors.DefaultSelector()
        for fifo in fifos:
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            self._keep.append(os.open(fifo, os.O_WRONLY))  # no EOF while nobody writes
            self._fds[fd] = fifo
            self._sel.register(fd, selectors.EVENT_READ)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sel.close()
        for fd in [*self._fds, *self._keep]:
            os.close(fd)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.02):
                fd = int(key.fd)
                data = os.read(fd, 4096).decode()
                self._react(self._fds[fd], data)

    def _react(self, fifo: Path, data: str) -> None:
        if fifo.name == "reset":
            self.resets[fifo.parent.name] += 1
            return
        for address in ADDRESS.findall(data):
            if fifo.name == "unbind":
                if self.driver(address) == fifo.parent.name and address not in self.stuck:
                    (self.dev(address) / "driver").unlink()
            elif fifo.name == "drivers_probe" and self.driver(address) is None:
                override = self.override(address)
                want = override if override not in ("", "(null)") else self.devs[address].native
                if want and address not in self.refuse and (self.bus / "drivers" / want).is_dir():
                    self._link(address, want)

    def _link(self, address: str, driver: str) -> None:
        (self.dev(address) / "driver").symlink_to(self.bus / "drivers" / driver)


# Modelled on real hosts (lspci -nn, /sys/kernel/iommu_groups).
WORKSTATION = [
    Dev("0000:00:00.0", "8086", "a700", "060000", None, "0"),  # host bridge
    # An RTX 4090 and its HDMI audio behind a root port, all three in one group.
    Dev("0000:00:01.0", "8086", "a70d", "060400", "pcieport", "2"),
    Dev("0000:01:00.0", "10de", "2684", "030000", "nvidia", "2"),
    Dev("0000:01:00.1", "10de", "22ba", "040300", "snd_hda_intel", "2"),
    # An H100 (3D controller, no audio), alone in its group.
    Dev("0000:02:00.0", "10de", "2330", "030200", None, "15"),
    Dev("0000:03:00.0", "144d", "a808", "010802", "nvme", "16"),
]
# An AMD chipset that puts a slot's GPU in one group with a NIC and a USB controller.
SHARED_GROUP = [
    Dev("0000:09:00.0", "8086", "1539", "020000", "igb", "20"),
    Dev("0000:0a:00.0", "1022", "149c", "0c0330", "xhci_hcd", "20"),
    Dev("0000:0b:00.0", "1002", "73bf", "030000", None, "20"),
]
