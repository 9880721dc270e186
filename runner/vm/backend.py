"""The hypervisor seam: what the rest of Snapfleet may do with a VM.

A ``Hypervisor`` makes ``Machine``s (by restoring a snapshot or by a cold
boot); a ``Machine`` runs commands through its guest agent and is destroyed.
Backends (QEMU today, Firecracker later) implement these few methods and
nothing more.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from runner.errors import InvalidStateError

if TYPE_CHECKING:
    from runner.net import CloneNetwork
    from runner.net.policy import EgressPolicy
    from runner.snapshots import Snapshot
    from runner.vm.agent_client import ExecSession


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


class Machine(ABC):
    """One running VM, reached through its guest agent."""

    vm_id: str
    network: CloneNetwork | None
    lifecycle: Lifecycle

    @property
    def state(self) -> VMState:
        return self.lifecycle.state

    @abstractmethod
    async def exec(
        self,
        argv: Sequence[str] | None = None,
        *,
        script: str | None = None,
        shell: str = "/bin/sh",
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> ExecSession:
        """Start a command in the guest; output streams from the returned session."""

    @abstractmethod
    async def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a file inside the guest."""

    @abstractmethod
    async def destroy(self) -> TeardownReport:
        """Stop the VM and reclaim everything it holds. Safe to call twice."""

    @property
    @abstractmethod
    def exit_status(self) -> int | None:
        """The VMM's exit status once it has exited, else None."""


class Hypervisor(ABC):
    """Makes machines."""

    @abstractmethod
    async def restore(
        self,
        snapshot: Snapshot,
        *,
        hostname: str | None = None,
        env: Mapping[str, str] | None = None,
        policy: EgressPolicy | None = None,
    ) -> Machine:
        """Clone a VM from a snapshot, configured (clock, RNG, hostname, env, resolvers)
        and READY, its network open as far as ``policy`` allows (default: egress none)."""

    @abstractmethod
    async def boot(
        self,
        spec: MachineSpec,
        rootfs: Path,
        *,
        hostname: str | None = None,
        policy: EgressPolicy | None = None,
    ) -> Machine:
        """Cold-boot a VM on a private overlay of ``rootfs`` and wait for its agent."""
