"""Lifecycle table and command lines, without starting anything."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from runner.errors import InvalidStateError
from runner.vm.backend import Lifecycle, MachineSpec, VMState
from runner.vm.qemu_args import QemuRuntime, device_layout, qemu_argv

SPEC = MachineSpec(
    vcpus=2,
    memory_mib=512,
    kernel=Path("/k"),
    initramfs=Path("/i"),
    cmdline="console=ttyS0",
    accel="tcg",
    cpu="max",
    network=True,
    tcg_tb_size_mib=64,
)


def test_lifecycle_happy_path() -> None:
    life = Lifecycle("v1")
    for state in (VMState.READY, VMState.STOPPING, VMState.DESTROYED):
        life.move(state)
    assert life.state is VMState.DESTROYED


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ((), VMState.DESTROYED),
        ((VMState.READY, VMState.STOPPING, VMState.DESTROYED), VMState.READY),
        ((VMState.FAILED,), VMState.READY),
    ],
)
def test_lifecycle_forbidden(path: tuple[VMState, ...], bad: VMState) -> None:
    life = Lifecycle("v1")
    for state in path:
        life.move(state)
    with pytest.raises(InvalidStateError):
        life.move(bad)


def test_exec_on_destroyed_is_an_error() -> None:
    life = Lifecycle("v1")
    life.move(VMState.STOPPING)
    life.move(VMState.DESTROYED)
    with pytest.raises(InvalidStateError, match="cannot exec in state destroyed"):
        life.require("exec", VMState.READY)


def _rt(**kw: object) -> QemuRuntime:
    base: dict[str, object] = dict(
        disk=Path("/d"), disk_format="raw", console_fd=4, qmp_fd=5, agent_fd=6,
        pidfile=Path("/vms/v1/qemu.pid"), tap="tap0",
    )
    base.update(kw)
    return QemuRuntime(**base)  # type: ignore[arg-type]


def _devices(argv: list[str]) -> list[str]:
    return [argv[i + 1].split(",")[0] for i, a in enumerate(argv) if a == "-device"]


def test_template_and_clone_share_the_device_layout() -> None:
    template = qemu_argv("qemu", SPEC, _rt(mem_path=Path("/m"), mem_shared=True))
    clone = qemu_argv(
        "qemu",
        SPEC,
        _rt(disk_format="qcow2", disk_cache="unsafe", mem_path=Path("/m"), incoming=True),
    )
    assert _devices(template) == _devices(clone)
    assert "share=on" in " ".join(template)
    assert "share=off" in " ".join(clone)
    assert "-incoming" in clone
    assert "-incoming" not in template


def test_accel_arguments() -> None:
    tcg = qemu_argv("qemu", SPEC, _rt())
    assert tcg[tcg.index("-accel") + 1] == "tcg,thread=multi,tb-size=64"
    kvm = qemu_argv("qemu", replace(SPEC, accel="kvm", cpu="host"), _rt())
    assert kvm[kvm.index("-accel") + 1] == "kvm"
    assert kvm[kvm.index("-cpu") + 1] == "host"


def test_layout_changes_with_shape() -> None:
    assert device_layout(SPEC) != device_layout(replace(SPEC, memory_mib=1024))
    assert device_layout(SPEC) != device_layout(replace(SPEC, network=False))
    assert device_layout(SPEC) == device_layout(replace(SPEC, kernel=Path("/other")))


def test_argv_points_into_the_vm_directory_and_never_reboots() -> None:
    # Recovery finds a VM's QEMU (after a daemon crash) by an argv path into its directory.
    argv = qemu_argv("qemu", SPEC, _rt())
    assert any(a.startswith("/vms/v1/") for a in argv)
    assert "-no-reboot" in argv
    assert argv[argv.index("-serial") + 1] == "chardev:console"
    assert "file,id=console,path=/dev/fdset/2,append=on" in argv
    assert "fd=4,set=2" in argv
