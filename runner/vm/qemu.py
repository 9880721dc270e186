"""The QEMU backend: clones restored from file-backed snapshots, and cold boots.

A clone is a QEMU process started with the template's exact device layout,
its RAM mapped MAP_PRIVATE from the template's memory file (copy-on-write, the
file is never written), its disk a qcow2 overlay on the template's disk, and
its network a namespace of its own. QMP and the agent channel are socketpairs
handed to QEMU as descriptors, so no socket file exists to leak.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner import disk
from runner.errors import AgentError, RestoreError, VMError
from runner.host import qemu_version
from runner.net.policy import EgressPolicy
from runner.vm.backend import BackendContext, Devices, Hypervisor, Machine, MachineSpec
from runner.vm.qemu_args import device_layout
from runner.vm.qemu_machine import QemuMachine, new_vm_id

if TYPE_CHECKING:
    from runner.snapshots import Snapshot

__all__ = ["QemuHypervisor", "QemuMachine", "hypervisor", "new_vm_id", "qemu_processes"]


def hypervisor(context: BackendContext) -> QemuHypervisor:
    """The backend's factory (``vm.backend = "qemu"``)."""
    return QemuHypervisor(context)


class QemuHypervisor(Hypervisor):
    """Makes QEMU machines: clones of snapshots, cold boots and templates."""

    name = "qemu"

    async def version(self) -> str:
        return await qemu_version(self.settings.qemu_binary)

    def device_layout(self, spec: MachineSpec) -> dict[str, object]:
        return device_layout(spec)

    def processes(self) -> dict[str, int]:
        return qemu_processes(self.vms_dir)

    async def prepare(self, snapshot: Snapshot) -> QemuMachine:
        """Everything a restore needs before the snapshot loads: directory, network,
        overlay and a QEMU process waiting in ``-incoming defer``.

        A warm pool keeps machines in this state so a job skips process start-up.
        """
        snapshot.check_compatible()
        machine = self._new_machine()
        machine.prepared_for = snapshot.key

        async def build() -> None:
            overlay = await machine.setup(
                self.net_manager if snapshot.spec.network else None,
                lambda d: disk.clone_overlay(snapshot.overlay, d / "overlay.qcow2"),
            )
            await machine.spawn(
                snapshot.spec,
                disk=overlay,
                disk_format="qcow2",
                disk_cache="unsafe",
                mem_path=snapshot.memory,
                incoming=True,
            )

        await _build_or_destroy(machine, build(), RestoreError, "restore failed")
        return machine

    async def resume(
        self,
        machine: Machine,
        snapshot: Snapshot,
        *,
        hostname: str | None = None,
        env: Mapping[str, str] | None = None,
        policy: EgressPolicy | None = None,
    ) -> QemuMachine:
        """Load the snapshot into a prepared machine, wait for its agent, configure it.

        The clone's network forwards nothing until ``policy`` (default: egress
        "none") is in place, which happens while the snapshot loads.
        """
        if not isinstance(machine, QemuMachine):
            raise RestoreError("not a QEMU machine", vm_id=machine.vm_id)
        if machine.prepared_for != snapshot.key:
            raise RestoreError(
                f"machine was prepared for snapshot {machine.prepared_for}, not {snapshot.key}",
                vm_id=machine.vm_id,
            )

        async def build() -> None:
            await _together(machine.load_snapshot(snapshot.state), self._open(machine, policy))
            await machine.connect_agent(self.settings.restore_timeout_s)
            assert machine.agent is not None
            await machine.agent.configure(
                hostname=hostname or f"snapfleet-{machine.vm_id}",
                env=env,
                nameservers=self._nameservers(machine),
            )

        await _build_or_destroy(machine, build(), RestoreError, "restore failed")
        machine.mark_ready()
        return machine

    async def assign(
        self, machine: Machine, *, hostname: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(machine, QemuMachine) or machine.agent is None:
            raise RestoreError("not a running QEMU machine", vm_id=machine.vm_id)
        try:
            await machine.agent.configure(
                hostname=hostname or f"snapfleet-{machine.vm_id}",
                env=env,
                nameservers=self._nameservers(machine),
            )
        except AgentError as exc:
            error = await machine.died_error(exc)
            await machine.destroy()
            raise RestoreError(f"hot clone failed at assignment: {error}",
                               vm_id=machine.vm_id) from exc

    async def boot(
        self,
        spec: MachineSpec,
        rootfs: Path,
        *,
        hostname: str | None = None,
        policy: EgressPolicy | None = None,
        devices: Devices | None = None,
    ) -> QemuMachine:
        """Cold boot on an overlay of ``rootfs`` (no snapshot involved), ``devices`` on
        the command line."""
        machine = self._new_machine()

        async def build() -> None:
            overlay = await machine.setup(
                self.net_manager if spec.network else None,
                lambda d: disk.create_overlay(
                    rootfs, d / "overlay.qcow2", qemu_img=self.settings.qemu_img_binary
                ),
            )
            await machine.spawn(spec, disk=overlay, disk_format="qcow2", disk_cache="unsafe",
                                devices=devices)
            await _together(
                machine.connect_agent(self.settings.boot_timeout_s), self._open(machine, policy)
            )
            assert machine.agent is not None
            await machine.agent.configure(
                hostname=hostname or f"snapfleet-{machine.vm_id}",
                nameservers=self._nameservers(machine),
            )

        await _build_or_destroy(machine, build(), VMError, "cold boot failed")
        machine.mark_ready()
        return machine

    async def boot_template(self, spec: MachineSpec, disk_path: Path, memory: Path) -> QemuMachine:
        """Boot a template writing straight to ``disk_path`` with RAM shared in ``memory``."""
        machine = self._new_machine()

        async def build() -> None:
            await machine.setup(self.net_manager if spec.network else None, _given(disk_path))
            await machine.spawn(
                spec, disk=disk_path, disk_format="raw", mem_path=memory, mem_shared=True
            )
            await machine.connect_agent(self.settings.boot_timeout_s)

        await _build_or_destroy(machine, build(), VMError, "template boot failed")
        machine.mark_ready()
        return machine

    async def _open(self, machine: QemuMachine, policy: EgressPolicy | None) -> None:
        if machine.network is not None and self.net_manager is not None:
            chosen = policy or EgressPolicy(egress="none")
            await self.net_manager.apply_policy(machine.network, chosen)

    def _nameservers(self, machine: QemuMachine) -> list[str]:
        if machine.network is None or self.net_manager is None:
            return []
        return [str(n) for n in self.net_manager.config.nameservers]

    def _new_machine(self) -> QemuMachine:
        self.vms_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        vm_id = new_vm_id()
        while (self.vms_dir / vm_id).exists() or vm_id in self.live:
            vm_id = new_vm_id()
        machine = QemuMachine(vm_id, self.settings, self.vms_dir / vm_id, instance=self.instance)
        self.live[vm_id] = machine
        machine.on_gone = lambda: self.live.pop(vm_id, None)
        return machine


async def _build_or_destroy(
    machine: QemuMachine,
    build: Awaitable[None],
    error: type[VMError],
    what: str,
) -> None:
    """Await ``build``; on any failure destroy the machine, then raise ``error`` from it."""
    try:
        await build
    except asyncio.CancelledError:
        await machine.destroy()
        raise
    except Exception as exc:
        await machine.destroy()
        if isinstance(exc, error):
            raise
        raise error(f"{what}: {exc}", vm_id=machine.vm_id) from exc


async def _together(*steps: Coroutine[Any, Any, None]) -> None:
    """Run ``steps`` concurrently; the first failure cancels the rest and is raised as is."""
    try:
        async with asyncio.TaskGroup() as group:
            for step in steps:
                group.create_task(step)
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None


def qemu_processes(vms_dir: Path) -> dict[str, int]:
    """QEMU processes whose command line points into ``vms_dir``: vm_id -> pid."""
    marker = str(vms_dir).rstrip("/") + "/"
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not argv or "qemu-system" not in argv[0]:
            continue
        for arg in argv:
            start = arg.find(marker)
            if start >= 0:
                vm_id = arg[start + len(marker):].split("/")[0]
                found[vm_id] = int(entry.name)
                break
    return found


def _given(path: Path) -> Callable[[Path], Coroutine[Any, Any, Path]]:
    async def make(_directory: Path) -> Path:
        return path

    return make
