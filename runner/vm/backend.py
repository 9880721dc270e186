"""The hypervisor seam: everything the rest of Snapfleet may do with a VM.

A ``Hypervisor`` makes ``Machine``s (by restoring a snapshot, in two steps
so a pool can do the first ahead of time, or by a cold boot); a ``Machine``
runs commands through its guest agent and is destroyed. The engine, the warm
pool, the daemon and recovery use only what is declared here; nothing outside
``runner/vm/`` imports a backend module.

The contract for a backend (QEMU today; Firecracker or Cloud Hypervisor next):

* a module ``runner/vm/<name>.py`` whose ``hypervisor(context)`` returns a
  ``Hypervisor`` for a `BackendContext`; ``vm.backend = "<name>"`` selects it
  (see `runner.vm.load_backend`). Nothing else in the tree changes;
* each VM lives in ``context.vms_dir / vm_id`` and holds the `VMLock` of its
  id from before it makes anything until its teardown ends, so recovery
  (`processes`, the directories, the network names) can tell ours from orphans;
* `device_layout` names what must match between a template and its clones; it
  goes into the snapshot manifest's backend section with ``name`` and
  `version`, and a snapshot is reused only when all three match.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from runner.errors import InvalidStateError, SnapfleetError, VMError

if TYPE_CHECKING:
    from runner.agent.messages import Command
    from runner.config import VMSettings
    from runner.gpu.source import DeviceSource
    from runner.gpu.sysfs import GpuUnit
    from runner.net import CloneNetwork
    from runner.net.manager import NetworkManager
    from runner.net.policy import EgressPolicy
    from runner.snapshots import Snapshot
    from runner.vm.agent_client import ExecResult, OutputChunk


class VMState(enum.Enum):
    """Lifecycle of one VM."""

    STARTING = "starting"  # VMM spawned, restore or boot under way
    READY = "ready"  # agent answers; jobs may exec
    FAILED = "failed"  # the VMM died or the agent went away; only destroy is allowed
    STOPPING = "stopping"  # teardown under way
    DESTROYED = "destroyed"  # nothing of it remains


_TRANSITIONS: dict[VMState, frozenset[VMState]] = {
    VMState.STARTING: frozenset({VMState.READY, VMState.FAILED, VMState.STOPPING}),
    VMState.READY: frozenset({VMState.FAILED, VMState.STOPPING}),
    VMState.FAILED: frozenset({VMState.STOPPING}),
    VMState.STOPPING: frozenset({VMState.DESTROYED}),
    VMState.DESTROYED: frozenset(),
}


@dataclass(frozen=True)
class MachineSpec:
    """The shape of a VM. A clone must match its template's spec exactly."""

    vcpus: int
    memory_mib: int
    kernel: Path
    initramfs: Path
    cmdline: str
    accel: str
    cpu: str
    network: bool = True
    tcg_tb_size_mib: int = 0
    pcie_root_ports: int = 0
    """Empty PCIe root ports for devices plugged later (GPU profiles); they are part
    of the device layout, so a GPU profile's snapshot is never a plain one's."""


@dataclass(frozen=True)
class Devices:
    """Devices for one VM: a GPU lease's units and the source that knows how to attach them.

    Each unit is one card (a GPU with the other functions of its IOMMU group) and
    takes one root port."""

    source: DeviceSource
    units: tuple[GpuUnit, ...]


@dataclass
class TeardownReport:
    """What destroying a VM had to do; ``escalation`` says how the VMM was stopped."""

    vm_id: str
    escalation: str = "none"  # quit | sigterm | sigkill | already-exited | none
    errors: list[str] = field(default_factory=list)


class Lifecycle:
    """A VM state with transitions checked against one table."""

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        self._state = VMState.STARTING

    @property
    def state(self) -> VMState:
        return self._state

    def move(self, new: VMState) -> None:
        """Change state; InvalidStateError if the table forbids it."""
        if new not in _TRANSITIONS[self._state]:
            raise InvalidStateError(f"move to {new.value}", self._state.value, vm_id=self.vm_id)
        self._state = new

    def require(self, operation: str, *allowed: VMState) -> None:
        """Raise InvalidStateError unless the VM is in one of ``allowed``."""
        if self._state not in allowed:
            raise InvalidStateError(operation, self._state.value, vm_id=self.vm_id)


class Session(Protocol):
    """A running command in a guest: iterate it for output, then `wait` for the result.

    Iterating raises `AgentError` when the channel to the guest dropped."""

    @property
    def done(self) -> bool: ...

    def __aiter__(self) -> Session: ...

    async def __anext__(self) -> OutputChunk: ...

    async def wait(self) -> ExecResult: ...

    async def cancel(self, sig: int = ...) -> None:
        """Signal its process group (SIGKILL follows); the result says ``cancelled``."""
        ...


@dataclass(frozen=True)
class BackendContext:
    """What a backend is given to make its hypervisor."""

    settings: VMSettings
    vms_dir: Path
    net: NetworkManager | None
    instance: str = "0000"  # names this instance's cgroups


class Machine(ABC):
    """One running VM, reached through its guest agent."""

    vm_id: str
    network: CloneNetwork | None
    lifecycle: Lifecycle
    timings: dict[str, float]
    """Seconds per phase of its making (``setup``, ``spawn``, ``load``, ``agent``...)."""
    prepared_for: str | None
    """The snapshot key a machine made by `Hypervisor.prepare` is waiting for."""
    pooled: bool = False
    """It waited in a pool (warm: prepared; hot: restored) before a job took it."""
    hot: bool = False
    """It waited restored and answering (the hot pool), and was assigned to its job."""

    @property
    def state(self) -> VMState:
        return self.lifecycle.state

    @property
    @abstractmethod
    def pid(self) -> int | None:
        """The VMM's process id while it runs (recorded with the job's lease)."""

    @property
    @abstractmethod
    def exit_status(self) -> int | None:
        """The VMM's exit status once it has exited, else None."""

    @abstractmethod
    async def exec(self, command: Command) -> Session:
        """Start ``command`` in the guest; output streams from the returned session."""

    @abstractmethod
    async def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a file inside the guest."""

    @abstractmethod
    async def died_error(self, exc: BaseException) -> SnapfleetError:
        """Why the agent went away: the guest's own end, a dead VMM, or ``exc`` itself."""

    async def attach(self, devices: Devices) -> None:
        """Hot-plug ``devices`` into this READY machine, each card onto a free root port
        of its spec. Returns once the VMM has them; whether the guest has taken them
        is the caller's to check (through `exec`). VMError with the reason on failure."""
        raise VMError("this VM backend cannot attach devices", vm_id=self.vm_id)

    @abstractmethod
    async def save_snapshot(self, state: Path) -> None:
        """Save a template's device state to ``state`` (its RAM is already in its file)."""

    @abstractmethod
    async def destroy(self) -> TeardownReport:
        """Stop the VM and reclaim everything it holds. Safe to call twice."""


class Hypervisor(ABC):
    """Makes machines, and knows the ones it made and the ones it can find."""

    name: str
    """The value of ``vm.backend`` that selects it."""

    def __init__(self, context: BackendContext) -> None:
        self.settings = context.settings
        self.vms_dir = context.vms_dir
        self.net_manager = context.net
        self.instance = context.instance
        # Every machine from creation until its teardown finished: what recovery
        # must not mistake for an orphan.
        self.live: dict[str, Machine] = {}

    @abstractmethod
    async def version(self) -> str:
        """The VMM's version: a snapshot is reused only by the same one."""

    @abstractmethod
    def device_layout(self, spec: MachineSpec) -> dict[str, object]:
        """What must match between a template and its clones (kept in the manifest)."""

    @abstractmethod
    def processes(self) -> dict[str, int]:
        """This instance's VMM processes on the host, live or orphaned: vm_id -> pid."""

    @abstractmethod
    async def prepare(self, snapshot: Snapshot) -> Machine:
        """Everything a restore does before the snapshot loads (a pool does it ahead)."""

    @abstractmethod
    async def resume(
        self,
        machine: Machine,
        snapshot: Snapshot,
        *,
        hostname: str | None = None,
        env: Mapping[str, str] | None = None,
        policy: EgressPolicy | None = None,
    ) -> Machine:
        """Load ``snapshot`` into a prepared machine: configured (clock, RNG, hostname,
        env, resolvers) and READY, its network open as far as ``policy`` allows
        (default: egress none). On failure the machine is destroyed."""

    @abstractmethod
    async def assign(
        self, machine: Machine, *, hostname: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Make a READY machine that waited (hot) this job's: set the clock, reseed the
        guest's RNGs (kernel and agent), set hostname, resolvers and env."""

    async def restore(
        self,
        snapshot: Snapshot,
        *,
        hostname: str | None = None,
        env: Mapping[str, str] | None = None,
        policy: EgressPolicy | None = None,
    ) -> Machine:
        """Clone a VM from a snapshot: `prepare`, then `resume`."""
        started = time.monotonic()
        machine = await self.prepare(snapshot)
        await self.resume(machine, snapshot, hostname=hostname, env=env, policy=policy)
        machine.timings["total"] = time.monotonic() - started
        return machine

    @abstractmethod
    async def boot(
        self,
        spec: MachineSpec,
        rootfs: Path,
        *,
        hostname: str | None = None,
        policy: EgressPolicy | None = None,
        devices: Devices | None = None,
    ) -> Machine:
        """Cold-boot a VM on a private overlay of ``rootfs`` and wait for its agent;
        ``devices`` are attached from the start (on ``spec``'s root ports)."""

    @abstractmethod
    async def boot_template(self, spec: MachineSpec, disk: Path, memory: Path) -> Machine:
        """Boot a template writing to ``disk`` with its RAM in the file ``memory``."""
