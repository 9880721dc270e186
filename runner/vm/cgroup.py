"""A cgroup per VMM process: memory and pids limits, so one VM cannot take the host.

Both layouts are handled: the unified hierarchy (cgroup v2, where
``<root>/cgroup.controllers`` exists) and the legacy one, where ``memory`` and
``pids`` are mounted as hierarchies of their own under ``<root>`` (hosts still
on cgroup v1, this machine among them). Groups live at
``snapfleet/<instance>/<vm_id>`` in each hierarchy, so recovery finds its own.

Small blocking file writes: call through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from runner.errors import VMError

PIDS_MAX = 512  # QEMU needs a few dozen threads; a fork bomb in a VMM escape needs more


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    pids: int = PIDS_MAX


def _unified(root: Path) -> bool:
    return (root / "cgroup.controllers").exists()


def groups(root: Path, instance: str, vm_id: str) -> list[Path]:
    """The directories one VM's group occupies (one per hierarchy)."""
    tail = Path("snapfleet") / instance / vm_id
    if _unified(root):
        return [root / tail]
    return [root / "memory" / tail, root / "pids" / tail]


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _enable_controllers(root: Path, leaf: Path) -> None:
    # v2: each ancestor below the root must hand memory and pids down.
    parent = leaf.parent
    chain = []
    while parent != root:
        chain.append(parent)
        parent = parent.parent
    for directory in [root, *reversed(chain)]:
        with contextlib.suppress(OSError):  # the root may already have them, or refuse
            _write(directory / "cgroup.subtree_control", "+memory +pids")


def join(root: Path, instance: str, vm_id: str, pid: int, limits: Limits) -> list[Path]:
    """Make the VM's group with ``limits`` and move ``pid`` into it. Returns what was made.

    Raises VMError naming the file that refused, after removing what it made.
    """
    made: list[Path] = []
    try:
        if _unified(root):
            (leaf,) = groups(root, instance, vm_id)
            leaf.mkdir(parents=True, exist_ok=True)
            made.append(leaf)
            _enable_controllers(root, leaf)
            _write(leaf / "memory.max", str(limits.memory_bytes))
            if (leaf / "memory.swap.max").exists():
                _write(leaf / "memory.swap.max", "0")
            _write(leaf / "pids.max", str(limits.pids))
            _write(leaf / "cgroup.procs", str(pid))
        else:
            memory, pids = groups(root, instance, vm_id)
            for leaf in (memory, pids):
                leaf.mkdir(parents=True, exist_ok=True)
                made.append(leaf)
            _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
            _write(pids / "pids.max", str(limits.pids))
            for leaf in (memory, pids):
                _write(leaf / "cgroup.procs", str(pid))
    except OSError as exc:
        remove(made)
        raise VMError(
            f"cannot put the VMM in a cgroup ({exc.filename}: {exc.strerror}); "
            "set vm.cgroup = false to run without one",
            vm_id=vm_id,
        ) from exc
    return made


def remove(made: list[Path]) -> list[str]:
    """Remove a VM's groups (its process must have exited). Returns problems."""
    problems = []
    for leaf in made:
        try:
            os.rmdir(leaf)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"removing cgroup {leaf}: {exc.strerror}")
            continue
        with contextlib.suppress(OSError):  # the instance's group, once its last VM is gone
            os.rmdir(leaf.parent)
    return problems


def list_groups(root: Path, instance: str) -> set[str]:
    """vm_ids that have a group of this instance in any hierarchy."""
    parents = [root] if _unified(root) else [root / "memory", root / "pids"]
    found: set[str] = set()
    for parent in parents:
        directory = parent / "snapfleet" / instance
        with contextlib.suppress(FileNotFoundError):
            found |= {p.name for p in directory.iterdir() if p.is_dir()}
    return found
