"""QEMU command lines, as pure functions.

A clone must be started with exactly the devices, in the same order, as the
template it restores from; both command lines come from here, and
``device_layout`` is what snapshot manifests record and compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from runner.agent.channel import PORT_NAME
from runner.gpu.source import DeviceArgs
from runner.vm.backend import Devices, MachineSpec

# Every clone resumes with the template's MAC; namespaces keep clones apart.
GUEST_MAC = "52:54:00:5f:00:02"
LAYOUT_VERSION = 2
CONSOLE_FDSET = 2  # set 1 is the disk
# No vmgenid: QEMU 7.2's microvm does not describe it in ACPI, so the guest never
# sees it; the agent reseeds the kernel RNG after every restore instead.


@dataclass(frozen=True)
class QemuRuntime:
    """Per-process inputs: where this VM's files and channels are."""

    disk: Path
    disk_format: Literal["raw", "qcow2"]
    console_fd: int
    # In the VM's directory: recovery finds a VM's QEMU by an argv path into it.
    pidfile: Path
    qmp_fd: int
    agent_fd: int
    mem_path: Path | None = None  # file-backed RAM (templates and clones)
    mem_shared: bool = False  # template: MAP_SHARED; clone: MAP_PRIVATE (copy-on-write)
    incoming: bool = False  # wait for `migrate-incoming`
    sandbox: bool = True
    disk_cache: Literal["unsafe", "writeback"] = "writeback"
    run_as: str | None = None  # drop to this user once everything is open
    # Descriptors of the disk (read-write, read-only) handed to QEMU as an fd set:
    # an incoming migration reopens its disk after QEMU dropped to run_as.
    disk_fds: tuple[int, ...] = ()
    tap: str | None = None  # the clone network's tap (CloneNetwork.tap), when networked
    devices: tuple[str, ...] = ()  # -device options on root ports (a cold boot's GPUs)


def root_ports(spec: MachineSpec) -> list[str]:
    """The ids of ``spec``'s PCIe root ports, in order (devices go on them by id)."""
    return [f"rp{i}" for i in range(spec.pcie_root_ports)]


def _machine(spec: MachineSpec) -> str:
    # pcie=on gives microvm a PCIe host bridge (GPEX, described in its ACPI tables);
    # hot-plug on its root ports needs pcie_ports=native in the guest (no _OSC grant).
    return "microvm,pit=on,rtc=on" + (",pcie=on" if spec.pcie_root_ports else "")


def device_layout(spec: MachineSpec) -> dict[str, object]:
    """The parts of the VM that must match between a template and its clones."""
    return {
        "layout_version": LAYOUT_VERSION,
        "machine": _machine(spec),
        "accel": spec.accel,
        "cpu": spec.cpu,
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "devices": [
            "virtio-blk-device",
            *(["virtio-net-device"] if spec.network else []),
            "virtio-serial-device",
            "virtserialport",
            "virtio-rng-device",
            # Empty in the template and in every clone until a device is plugged.
            *(f"pcie-root-port:{port}" for port in root_ports(spec)),
        ],
    }


def qemu_argv(binary: str, spec: MachineSpec, rt: QemuRuntime) -> list[str]:
    """The full argv for one QEMU process."""
    machine = _machine(spec)
    args = [binary, "-name", "snapfleet", "-nodefaults", "-no-user-config", "-display", "none"]
    args += ["-pidfile", str(rt.pidfile)]
    if rt.mem_path is not None:
        machine += ",memory-backend=mem"
        share = "on" if rt.mem_shared else "off"
        args += [
            "-object",
            f"memory-backend-file,id=mem,size={spec.memory_mib}M,mem-path={rt.mem_path},share={share}",
        ]
    args += ["-M", machine, "-m", f"{spec.memory_mib}M", "-smp", str(spec.vcpus)]
    args += _accel_args(spec)
    args += ["-kernel", str(spec.kernel), "-initrd", str(spec.initramfs), "-append", spec.cmdline]
    # The console is a pipe the daemon reads (and caps); a file chardev takes it as an
    # fd set, `append` because a pipe cannot be truncated.
    args += [
        "-add-fd",
        f"fd={rt.console_fd},set={CONSOLE_FDSET}",
        "-chardev",
        f"file,id=console,path=/dev/fdset/{CONSOLE_FDSET},append=on",
        "-serial",
        "chardev:console",
    ]
    # A guest reset (a panic under `panic=-1`, a `reboot`) ends QEMU instead of booting
    # a fresh guest the job knows nothing of.
    args += ["-no-reboot"]
    disk = str(rt.disk)
    if rt.disk_fds:
        for fd in rt.disk_fds:
            args += ["-add-fd", f"fd={fd},set=1"]
        disk = "/dev/fdset/1"
    args += [
        "-drive",
        f"id=root,if=none,file={disk},format={rt.disk_format},cache={rt.disk_cache},discard=unmap",
        "-device",
        "virtio-blk-device,drive=root",
    ]
    if spec.network:
        if rt.tap is None:
            raise ValueError("a networked VM needs its clone network's tap")
        args += [
            "-netdev",
            f"tap,id=net0,ifname={rt.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-device,netdev=net0,mac={GUEST_MAC}",
        ]
    args += [
        "-device",
        "virtio-serial-device",
        "-chardev",
        f"socket,id=agent,fd={rt.agent_fd}",
        "-device",
        f"virtserialport,chardev=agent,name={PORT_NAME}",
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-device,rng=rng0",
        *_root_port_args(spec),
        *(arg for option in rt.devices for arg in ("-device", option)),
        "-chardev",
        f"socket,id=qmp,fd={rt.qmp_fd}",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    if rt.incoming:
        args += ["-incoming", "defer"]
    if rt.run_as is not None:
        args += ["-runas", rt.run_as]
    if rt.sandbox:
        # QEMU installs the filter before -runas switches user, so a filter that
        # denies set*id kills it then (seen with 7.2). Once switched to a user
        # other than root it holds no capabilities and cannot elevate anyway.
        elevate = "allow" if rt.run_as is not None else "deny"
        args += [
            "-sandbox",
            f"on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny",
        ]
    return args


def place_devices(
    devices: Devices, free_ports: Sequence[str], first: int = 0
) -> tuple[list[DeviceArgs], list[str]]:
    """``device_add`` arguments for ``devices`` on ``free_ports`` (one card per port,
    ids ``gpu<first>``, ``gpu<first+1>``...), and the ports left free. GpuError when
    the ports run out."""
    placed: list[DeviceArgs] = []
    free = list(free_ports)
    for index, unit in enumerate(devices.units):
        args = devices.source.device_args(unit, free, f"gpu{first + index}")
        taken = {arg["bus"] for arg in args}
        free = [port for port in free if port not in taken]
        placed += args
    return placed, free


def _root_port_args(spec: MachineSpec) -> list[str]:
    args = []
    for index, port in enumerate(root_ports(spec)):
        # chassis/slot pairs must be unique; the guest names its hot-plug slots by them.
        args += ["-device", f"pcie-root-port,id={port},chassis={index + 1},slot={index + 1}"]
    return args


def _accel_args(spec: MachineSpec) -> list[str]:
    if spec.accel == "kvm":
        return ["-accel", "kvm", "-cpu", spec.cpu]
    tcg = "tcg,thread=multi"
    if spec.tcg_tb_size_mib:
        tcg += f",tb-size={spec.tcg_tb_size_mib}"
    return ["-accel", tcg, "-cpu", spec.cpu]
