"""One QEMU process and everything it holds: directory, overlay, network, channels.

QMP and the agent channel are socketpairs and the serial console a pipe, all
handed to QEMU as descriptors, so no socket file exists to leak. Teardown
escalates: QMP quit, SIGTERM, SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from runner.config import VMSettings
from runner.errors import AgentError, GpuError, GuestEnded, SnapfleetError, VMDied, VMError
from runner.gpu.source import device_option
from runner.vm import cgroup
from runner.vm.agent_client import AgentClient, Command, ExecSession
from runner.vm.backend import Devices, Lifecycle, Machine, MachineSpec, TeardownReport, VMState
from runner.vm.console import ConsoleLog, console_pipe, describe, end_from_shutdown
from runner.vm.ownership import VMLock
from runner.vm.qemu_args import QemuRuntime, place_devices, qemu_argv, root_ports
from runner.vm.qmp import Qmp
from runner.vm.transports import SocketTransport

if TYPE_CHECKING:
    from runner.net import CloneNetwork
    from runner.net.manager import NetworkManager


PR_SET_THP_DISABLE = 41  # <linux/prctl.h>


def thp_for_children(allowed: bool) -> None:
    """Allow or forbid transparent huge pages in the processes this one starts from now on.

    The kernel keeps the flag per process, passes it to children and keeps it across
    exec (this process gets it too; it maps nothing with ``MADV_HUGEPAGE`` itself).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_THP_DISABLE, 0 if allowed else 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_THP_DISABLE): {os.strerror(err)}")


def new_vm_id() -> str:
    """A short random id; it names the VM's directory, namespace and veth."""
    return secrets.token_hex(4)


class QemuMachine(Machine):
    """One QEMU process and everything it holds: directory, overlay, network."""

    def __init__(
        self, vm_id: str, settings: VMSettings, directory: Path, *, instance: str = "0000"
    ) -> None:
        self.vm_id = vm_id
        self.lifecycle = Lifecycle(vm_id)
        self.network: CloneNetwork | None = None
        self.directory = directory
        self.agent: AgentClient | None = None
        self.timings: dict[str, float] = {}
        self.prepared_for: str | None = None  # snapshot key, for machines made by prepare()
        self.on_gone: Callable[[], object] | None = None
        self._settings = settings
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp: Qmp | None = None
        self._socks: list[socket.socket] = []
        self._watcher: asyncio.Task[None] | None = None
        self._console: ConsoleLog | None = None
        self._teardown: asyncio.Task[TeardownReport] | None = None
        self._net_manager: NetworkManager | None = None
        self._owner = VMLock(directory.parent, vm_id)
        self._instance = instance
        self._cgroups: list[Path] = []
        self._free_ports: list[str] = []  # root ports nothing is plugged into
        self._plugged = 0  # units attached so far (names their device ids)

    # -- what callers use -------------------------------------------------

    @property
    def exit_status(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    async def exec(self, command: Command) -> ExecSession:
        self.lifecycle.require("exec", VMState.READY)
        assert self.agent is not None
        try:
            return await self.agent.exec(command)
        except AgentError as exc:
            raise await self.died_error(exc) from exc

    async def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.lifecycle.require("put_file", VMState.READY)
        assert self.agent is not None
        try:
            await self.agent.put_file(path, data, mode)
        except AgentError as exc:
            raise await self.died_error(exc) from exc

    async def attach(self, devices: Devices) -> None:
        """``device_add`` each function of ``devices`` onto free root ports (QMP)."""
        self.lifecycle.require("attach", VMState.READY)
        qmp = self._require_qmp()
        started = time.monotonic()
        try:
            placed, free = place_devices(devices, self._free_ports, self._plugged)
        except GpuError as exc:
            raise VMError(f"cannot attach {len(devices.units)} device(s): {exc} (this VM has"
                          f" {len(self._free_ports)} free root port(s))",
                          vm_id=self.vm_id) from exc
        for arg in placed:
            try:
                await qmp.command("device_add", dict(arg))
            except VMError as exc:
                raise VMError(f"hot-plug of {arg['driver']} {arg.get('host', '')} onto"
                              f" {arg['bus']} failed: {exc}", vm_id=self.vm_id) from exc
        self._free_ports = free
        self._plugged += len(devices.units)
        self.timings["attach"] = time.monotonic() - started

    def _occupy(self, devices: Devices) -> list[str]:
        """``-device`` options placing ``devices`` on the root ports at boot (before spawn)."""
        placed, self._free_ports = place_devices(devices, self._free_ports, self._plugged)
        self._plugged += len(devices.units)
        return [device_option(arg) for arg in placed]

    async def died_error(self, exc: BaseException) -> SnapfleetError:
        """Explain an agent failure: the guest's own end (panic, reboot, power-off,
        read from its console) or a dead VMM are the usual causes.

        The agent channel usually reports EOF a moment before the VMM is reaped
        and its last console bytes are read, so give both a moment before deciding.
        """
        console = self._console
        guest_said = console is not None and console.watch.end is not None
        if self._proc is not None and self._proc.returncode is None and not guest_said:
            await _exited(self._proc, 1.0)
        if console is not None and self.exit_status is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(console.ended.wait(), 1.0)
        end = None if console is None else console.watch.end
        if end is None and self.exit_status == 0 and self._qmp is not None:
            end = end_from_shutdown(await self._qmp.shutdown_reason(0.5))
        if end is not None:
            tail = "" if console is None else console.watch.tail()
            return GuestEnded(describe(end), vm_id=self.vm_id, how=end, console=tail)
        status = self.exit_status
        if status is not None:
            tail = _tail(self.directory / "qemu.log")
            detail = f": {tail}" if tail else ""
            return VMDied(
                f"the VMM exited with status {status} while the job ran{detail}",
                vm_id=self.vm_id,
                returncode=status,
            )
        return VMError(f"guest agent failed: {exc}", vm_id=self.vm_id)

    async def destroy(self) -> TeardownReport:
        """Stop QEMU (quit → SIGTERM → SIGKILL) and reclaim every resource. Idempotent.

        Teardown runs in a task of its own so that cancelling the caller cannot
        leave a half-destroyed VM behind.
        """
        if self._teardown is None:
            self._teardown = asyncio.create_task(self._do_teardown(), name=f"teardown-{self.vm_id}")
        return await asyncio.shield(self._teardown)

    # -- building ---------------------------------------------------------

    async def setup(
        self,
        net_manager: NetworkManager | None,
        make_disk: Callable[[Path], Coroutine[Any, Any, Path]],
    ) -> Path:
        """Make the VM's directory, then its network namespace and disk side by side.

        Returns the disk path. If either fails the other is cancelled (and rolls back).
        """
        started = time.monotonic()
        # Ours before anything exists: recovery in another process sharing the
        # state dir leaves a VM alone while its lock is held.
        self.directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._owner.acquire()
        self.directory.mkdir(mode=0o700)
        try:
            async with asyncio.TaskGroup() as group:
                if net_manager is not None:
                    self._net_manager = net_manager
                    group.create_task(self._make_network(net_manager))
                disk_task = group.create_task(make_disk(self.directory))
        except ExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        self.timings["setup"] = time.monotonic() - started
        return disk_task.result()

    async def _make_network(self, net_manager: NetworkManager) -> None:
        self.network = await net_manager.create(self.vm_id)

    async def spawn(
        self,
        spec: MachineSpec,
        *,
        disk: Path,
        disk_format: Literal["raw", "qcow2"],
        disk_cache: Literal["unsafe", "writeback"] = "writeback",
        mem_path: Path | None = None,
        mem_shared: bool = False,
        incoming: bool = False,
        devices: Devices | None = None,
    ) -> None:
        """Start QEMU with QMP and agent socketpairs and a console pipe as inherited fds;
        ``devices`` go on ``spec``'s root ports from the start (a cold boot's GPUs)."""
        self._free_ports = root_ports(spec)
        options = self._occupy(devices) if devices is not None else []
        qmp_ours, qmp_theirs = socket.socketpair()
        agent_ours, agent_theirs = socket.socketpair()
        # QEMU reopens the disk when an incoming migration activates it, by then as
        # run_as: hand it descriptors, so no path needs to be open to that user.
        disk_fds = [os.open(disk, flags | os.O_CLOEXEC) for flags in (os.O_RDWR, os.O_RDONLY)]
        self._socks = [qmp_ours, agent_ours]
        console_ours, console_theirs = console_pipe()
        self._console = ConsoleLog(console_ours, self.console_log, self._settings.console_max_bytes)
        rt = QemuRuntime(
            console_fd=console_theirs,
            pidfile=self.directory / "qemu.pid",
            qmp_fd=qmp_theirs.fileno(),
            agent_fd=agent_theirs.fileno(),
            sandbox=self._settings.sandbox,
            disk=disk,
            disk_format=disk_format,
            disk_cache=disk_cache,
            mem_path=mem_path,
            mem_shared=mem_shared,
            incoming=incoming,
            run_as=self._settings.run_as,
            tap=None if self.network is None else self.network.tap,
            disk_fds=tuple(disk_fds),
            devices=tuple(options),
        )
        argv = qemu_argv(self._settings.qemu_binary, spec, rt)
        if self.network is not None:
            argv = self.network.exec_prefix() + argv
        started = time.monotonic()
        # Under TCG, QEMU asks for huge pages for its translation cache and ROMs, and
        # an idle clone then holds whole 2 MiB pages of them (bench/density.py). Set
        # per spawn, just before it: no await in between, so each QEMU gets its own.
        thp_for_children(spec.accel != "tcg" or self._settings.tcg_thp)
        with open(self.directory / "qemu.log", "wb") as log:  # noqa: ASYNC230 (local, tiny)
            os.chmod(log.fileno(), 0o600)
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=(
                        qmp_theirs.fileno(), agent_theirs.fileno(), console_theirs, *disk_fds
                    ),
                    start_new_session=True,
                )
            except OSError as exc:
                raise VMError(f"cannot start {argv[0]}: {exc}", vm_id=self.vm_id) from exc
            finally:
                qmp_theirs.close()
                agent_theirs.close()
                os.close(console_theirs)
                for fd in disk_fds:
                    os.close(fd)
        self._console.start(f"console-{self.vm_id}")
        self._watcher = asyncio.create_task(self._watch(), name=f"watch-{self.vm_id}")
        if self._settings.cgroup:
            await self._join_cgroup(spec)
        self._qmp = Qmp(self.vm_id)
        await self._qmp.connect(qmp_ours, timeout=self._settings.restore_timeout_s)
        self.timings["spawn"] = time.monotonic() - started

    async def load_snapshot(self, state_file: Path) -> None:
        """Load device state from ``state_file`` (RAM comes from the shared file) and resume."""
        qmp = self._require_qmp()
        started = time.monotonic()
        await qmp.command(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
        )
        fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await qmp.pass_fd(fd, "snapshot")
        finally:
            os.close(fd)
        await qmp.command("migrate-incoming", {"uri": "fd:snapshot"})
        await qmp.wait_migration(self._settings.restore_timeout_s, incoming=True)
        await qmp.command("cont")
        self.timings["load"] = time.monotonic() - started

    async def save_snapshot(self, state_file: Path) -> None:
        """Pause the VM and write its device state; RAM stays in the shared memory file."""
        qmp = self._require_qmp()
        await qmp.command(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
        )
        await qmp.command("stop")
        fd = os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await qmp.pass_fd(fd, "snapshot")
        finally:
            os.close(fd)
        await qmp.command("migrate", {"uri": "fd:snapshot"})
        await qmp.wait_migration(120.0)

    async def connect_agent(self, timeout: float) -> None:
        """Wait until the guest agent answers a ping."""
        started = time.monotonic()
        sock = self._socks[1]
        try:
            self.agent = await AgentClient.connect(SocketTransport(sock), timeout=timeout)
        except AgentError as exc:
            if self.exit_status is not None:
                raise await self.died_error(exc) from exc
            tail = _tail(self.console_log)
            raise VMError(
                f"guest agent did not answer: {exc}; console: {tail}", vm_id=self.vm_id
            ) from exc
        self.timings["agent"] = time.monotonic() - started

    def mark_ready(self) -> None:
        self.lifecycle.move(VMState.READY)

    # -- internals --------------------------------------------------------

    async def _join_cgroup(self, spec: MachineSpec) -> None:
        assert self._proc is not None
        # tb-size 0 under TCG means QEMU's default translation cache of 1 GiB.
        tb = spec.tcg_tb_size_mib or (1024 if spec.accel == "tcg" else 0)
        mib = spec.memory_mib + self._settings.vmm_overhead_mib + tb
        limits = cgroup.Limits(memory_bytes=mib * 2**20)
        self._cgroups = await asyncio.to_thread(
            cgroup.join,
            self._settings.cgroup_root,
            self._instance,
            self.vm_id,
            self._proc.pid,
            limits,
        )

    def _require_qmp(self) -> Qmp:
        if self._qmp is None:
            raise VMError("QMP is not connected", vm_id=self.vm_id)
        return self._qmp

    async def _watch(self) -> None:
        """Fail the VM when QEMU exits or its console shows the guest ending.

        A guest that halted or panicked without resetting leaves QEMU running and
        the agent channel open: closing the agent fails whatever waits on it now.
        """
        assert self._proc is not None
        assert self._console is not None
        waits = [
            asyncio.ensure_future(self._proc.wait()),
            asyncio.ensure_future(self._console.ended.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        if self.lifecycle.state in (VMState.STARTING, VMState.READY):
            self.lifecycle.move(VMState.FAILED)
        if self.agent is not None and self._console.watch.end is not None:
            await self.agent.close()

    async def _do_teardown(self) -> TeardownReport:
        if self.lifecycle.state is not VMState.STOPPING:
            self.lifecycle.move(VMState.STOPPING)
        report = TeardownReport(self.vm_id)
        if self.agent is not None:
            await _collect(report, "closing agent", self.agent.close())
        report.escalation = await self._stop_vmm(report)
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._qmp is not None:
            await _collect(report, "closing QMP", self._qmp.close())
        if self._console is not None:
            await self._console.stop()
            if self._console.error is not None:
                report.errors.append(self._console.error)
        for sock in self._socks:
            sock.close()
        report.errors.extend(await asyncio.to_thread(cgroup.remove, self._cgroups))
        if self.network is not None and self._net_manager is not None:
            await _collect(report, "removing network", self._net_manager.destroy(self.vm_id))
        try:
            shutil.rmtree(self.directory, ignore_errors=False)
        except FileNotFoundError:
            pass
        except OSError as exc:
            report.errors.append(f"removing {self.directory}: {exc}")
        # Whatever a failed step left is unowned now: the next reconcile reclaims it.
        self._owner.release()
        self.lifecycle.move(VMState.DESTROYED)
        if self.on_gone is not None:
            self.on_gone()
        return report

    async def _stop_vmm(
        self, report: TeardownReport
    ) -> Literal["quit", "sigterm", "sigkill", "already-exited", "none"]:
        proc = self._proc
        if proc is None:
            return "none"
        if proc.returncode is not None:
            return "already-exited"
        grace = self._settings.stop_timeout_s
        if self._qmp is not None:
            with contextlib.suppress(VMError):
                await self._qmp.command("quit", timeout=grace)
            if await _exited(proc, grace):
                return "quit"
        for sig, name in ((signal.SIGTERM, "sigterm"), (signal.SIGKILL, "sigkill")):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            if await _exited(proc, grace):
                report.errors.append(f"QEMU ignored a polite stop; ended with {name.upper()}")
                return name  # type: ignore[return-value]
        report.errors.append(f"QEMU pid {proc.pid} survived SIGKILL")
        return "sigkill"


async def _collect(report: TeardownReport, what: str, step: Awaitable[None]) -> None:
    try:
        await step
    except Exception as exc:
        report.errors.append(f"{what}: {exc}")


async def _exited(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        return False
    return True


def _tail(path: Path, limit: int = 400) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode(errors="replace").strip().replace("\n", " | ")
