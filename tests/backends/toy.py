"""A toy VM backend: the `runner.vm.backend` seam implemented in-process.

Selected with ``vm.backend = "tests.backends.toy"``; nothing else in the tree
knows it exists, which is the point: it proves a backend is one module and a
config value. A "VM" is a directory holding its lock (as the contract asks);
a command is a host ``/bin/sh`` child in that directory, so daemon tests run
real scripts with real exit codes, output and cancellation, in milliseconds.
It never pretends to be a VM in real-VM tests.

Tests steer it through ``ToyHypervisor.gate`` (restores wait until it is
set) and ``fail_restore`` (the next restores raise RestoreError).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from runner.agent.messages import Command
from runner.config import Settings, load_settings
from runner.errors import AgentError, RestoreError, SnapfleetError, VMError
from runner.gpu.sysfs import GpuUnit
from runner.net.policy import EgressPolicy
from runner.service.notify import Notifier
from runner.snapshots import Snapshot
from runner.vm.agent_client import ExecResult, OutputChunk
from runner.vm.backend import (
    BackendContext,
    Devices,
    Hypervisor,
    Lifecycle,
    Machine,
    MachineSpec,
    Session,
    TeardownReport,
    VMState,
)
from runner.vm.ownership import VMLock

made: list[ToyHypervisor] = []
"""Every hypervisor this module made in this process, for tests to steer."""


def hypervisor(context: BackendContext) -> ToyHypervisor:
    toy = ToyHypervisor(context)
    made.append(toy)
    return toy


class ToySession:
    """A host shell child standing in for an exec in a guest."""

    def __init__(self, proc: asyncio.subprocess.Process, timeout: float | None) -> None:
        self._proc = proc
        self._queue: asyncio.Queue[OutputChunk | None] = asyncio.Queue()
        self._cancelled = False
        self._timed_out = False
        self._readers = [
            asyncio.create_task(self._pump(proc.stdout, "stdout")),
            asyncio.create_task(self._pump(proc.stderr, "stderr")),
        ]
        self._timer = (asyncio.get_running_loop().call_later(timeout, self._expire)
                       if timeout is not None else None)
        self._open = 2

    @property
    def done(self) -> bool:
        return self._proc.returncode is not None

    def __aiter__(self) -> Session:
        return self

    async def __anext__(self) -> OutputChunk:
        while self._open:
            chunk = await self._queue.get()
            if chunk is not None:
                return chunk
            self._open -= 1
        raise StopAsyncIteration

    async def wait(self) -> ExecResult:
        code = await self._proc.wait()
        await asyncio.gather(*self._readers)
        if self._timer is not None:
            self._timer.cancel()
        if code < 0:
            return ExecResult(None, -code, self._timed_out, self._cancelled)
        return ExecResult(code, None, self._timed_out, self._cancelled)

    async def cancel(self, sig: int = signal.SIGTERM) -> None:
        if self.done:
            return
        self._cancelled = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def _expire(self) -> None:
        self._timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    async def _pump(self, pipe: asyncio.StreamReader | None, stream: Literal["stdout", "stderr"]
                    ) -> None:
        assert pipe is not None
        while data := await pipe.read(65536):
            await self._queue.put(OutputChunk(stream, data))
        await self._queue.put(None)


class ToyMachine(Machine):
    def __init__(self, vm_id: str, directory: Path, owner: ToyHypervisor) -> None:
        self.vm_id = vm_id
        self.network = None
        self.lifecycle = Lifecycle(vm_id)
        self.timings = {}
        self.prepared_for = None
        self.directory = directory
        self._owner = owner
        self._lock = VMLock(directory.parent, vm_id)
        self._lock.acquire()
        directory.mkdir(mode=0o700)
        self._sessions: list[ToySession] = []
        self.env: dict[str, str] = {}
        self.died = False
        self.devices: list[GpuUnit] = []  # attached (recorded only: a toy has no PCI bus)

    @property
    def pid(self) -> int | None:
        return None if self.state in (VMState.STOPPING, VMState.DESTROYED) else os.getpid()

    @property
    def exit_status(self) -> int | None:
        return -9 if self.died else None

    async def exec(self, command: Command) -> Session:
        self.lifecycle.require("exec", VMState.READY)
        argv = (command.shell, "-c", command.script) if command.script is not None else command.argv
        assert argv is not None
        workdir = self.directory / (command.cwd or "").lstrip("/")
        if not workdir.is_dir():
            raise AgentError(f"no directory {command.cwd}")
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=workdir, env={"PATH": os.environ["PATH"], **self.env, **command.env},
            stdin=asyncio.subprocess.DEVNULL if command.stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        if proc.stdin is not None and command.stdin is not None:
            proc.stdin.write(command.stdin)  # buffered by the transport, like the agent's feeder
            proc.stdin.close()
        session = ToySession(proc, command.timeout)
        self._sessions.append(session)
        self._owner.execs.append(command)
        return session

    async def attach(self, devices: Devices) -> None:
        self.lifecycle.require("attach", VMState.READY)
        self.devices.extend(devices.units)

    async def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        target = self.directory / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(mode)

    async def died_error(self, exc: BaseException) -> SnapfleetError:
        return VMError(f"toy VM died: {exc}", vm_id=self.vm_id)

    async def save_snapshot(self, state: Path) -> None:
        state.write_text("toy state\n")

    async def destroy(self) -> TeardownReport:
        report = TeardownReport(self.vm_id, escalation="quit")
        if self.state is VMState.DESTROYED:
            return report
        if self.state is not VMState.STOPPING:
            self.lifecycle.move(VMState.STOPPING)
        for session in self._sessions:
            await session.cancel(signal.SIGKILL)
        shutil.rmtree(self.directory, ignore_errors=True)
        self._lock.release()
        self.lifecycle.move(VMState.DESTROYED)
        self._owner.live.pop(self.vm_id, None)
        self._owner.destroyed.append(self.vm_id)
        return report


class ToyHypervisor(Hypervisor):
    name = "toy"

    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_restore = 0
        self.restores = 0
        self.destroyed: list[str] = []
        self.execs: list[Command] = []  # every command run in one of its VMs, in order
        self.calls: list[float] = []  # monotonic time of each restore's start (bench.daemon)
        self.called = asyncio.Event()  # set at each restore's start
        self._next = 0

    async def version(self) -> str:
        return "1"

    def device_layout(self, spec: MachineSpec) -> dict[str, object]:
        return {"vcpus": spec.vcpus, "memory_mib": spec.memory_mib}

    def processes(self) -> dict[str, int]:
        return {}

    async def prepare(self, snapshot: Snapshot) -> Machine:
        self.calls.append(time.monotonic())
        self.called.set()
        machine = self._new()
        machine.prepared_for = snapshot.key
        return machine

    async def resume(
        self,
        machine: Machine,
        snapshot: Snapshot,
        *,
        hostname: str | None = None,
        env: Mapping[str, str] | None = None,
        policy: EgressPolicy | None = None,
    ) -> Machine:
        assert isinstance(machine, ToyMachine)
        started = time.monotonic()
        try:
            await self.gate.wait()
            if self.fail_restore:
                self.fail_restore -= 1
                raise RestoreError("the toy refused to restore", vm_id=machine.vm_id)
        except BaseException:
            await machine.destroy()
            raise
        machine.env = dict(env or {})
        machine.timings["load"] = time.monotonic() - started
        machine.lifecycle.move(VMState.READY)
        self.restores += 1
        return machine

    async def assign(
        self, machine: Machine, *, hostname: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        assert isinstance(machine, ToyMachine)
        machine.env = dict(env or {})

    async def boot(
        self,
        spec: MachineSpec,
        rootfs: Path,
        *,
        hostname: str | None = None,
        policy: EgressPolicy | None = None,
        devices: Devices | None = None,
    ) -> Machine:
        machine = self._new()
        if devices is not None:
            machine.devices.extend(devices.units)
        machine.lifecycle.move(VMState.READY)
        return machine

    async def boot_template(self, spec: MachineSpec, disk: Path, memory: Path) -> Machine:
        with memory.open("wb") as f:
            f.truncate(spec.memory_mib * 2**20)
        machine = self._new()
        machine.lifecycle.move(VMState.READY)
        return machine

    def _new(self) -> ToyMachine:
        self.vms_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._next += 1
        vm_id = f"toy{self._next:05d}"
        machine = ToyMachine(vm_id, self.vms_dir / vm_id, self)
        self.live[vm_id] = machine
        return machine


def toy_settings(tmp_path: Path, **extra: object) -> Settings:
    """A config whose profile is its own tiny "image" and whose VMs are toys."""
    image = tmp_path / "image"
    image.mkdir()
    for name in ("vmlinux", "initramfs", "rootfs.ext4"):
        (image / name).write_bytes(b"toy\n")
    profile = {"kernel": image / "vmlinux", "initramfs": image / "initramfs",
               "rootfs": image / "rootfs.ext4", "vcpus": 1, "memory_mib": 128}
    return load_settings(
        None,
        paths={"state_dir": tmp_path / "state", "cache_dir": tmp_path / "cache",
               "runtime_dir": tmp_path / "run"},
        net={"enabled": False},
        vm={"backend": "tests.backends.toy", "cgroup": False, "run_as": None},
        daemon={"api_socket": tmp_path / "api.sock", "metrics_listen": ""},
        profiles={"default": profile},
        gitlab={"allowed_profiles": ["default"]},
        **extra,
    )


class ReadyNotifier(Notifier):
    """Tells an in-process test or bench when the daemon is READY (as systemd would)."""

    def __init__(self) -> None:
        super().__init__({})
        self.is_ready = asyncio.Event()

    def ready(self, status: str | None = None) -> bool:
        self.is_ready.set()
        return True
