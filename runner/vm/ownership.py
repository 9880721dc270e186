"""Which process owns a VM: a lock file per VM, held while the VM exists.

Several processes may share one state directory (a daemon and ``snapfleet
run`` on the same host and config), so "not one of my VMs" does not mean
"orphan". The owner takes ``<vms_dir>/<vm_id>.lock`` with ``flock`` before
it makes anything for the VM and gives it up after the last thing is gone;
the kernel drops the lock when the owner dies. Recovery reclaims a VM only
when it can take that lock itself, or the file is gone.

Tiny local file operations, done on the calling thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


def lock_path(vms_dir: Path, vm_id: str) -> Path:
    return vms_dir / f"{vm_id}.lock"


class VMLock:
    """The owner's hold on one VM id."""

    def __init__(self, vms_dir: Path, vm_id: str) -> None:
        self.path = lock_path(vms_dir, vm_id)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock; BlockingIOError if someone else holds it."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Remove the file, then drop the lock. Idempotent."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def owned_elsewhere(vms_dir: Path, vm_id: str) -> bool:
    """Whether a live process (this one included, through another lock) holds ``vm_id``."""
    try:
        fd = os.open(lock_path(vms_dir, vm_id), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def is_lock_file(name: str) -> bool:
    return name.endswith(".lock")


class InstanceUse:
    """A process's shared hold on its instance while it uses what the instance shares
    on the host (the host nftables table), in ``<state_dir>/instance.lock``.

    Every engine of one state directory holds it shared; on the way out, the one
    that can turn it exclusive is the last, and may remove those shared things once
    no VM of the instance is left (`vms_left`). A process that died let go of it.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "instance.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._fd = fd

    def release(self) -> bool:
        """Let go; whether this process was the instance's last user. Idempotent."""
        if self._fd is None:
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        else:
            return True
        finally:
            os.close(self._fd)
            self._fd = None


def vms_left(vms_dir: Path) -> bool:
    """Whether any VM of the instance still has a lock file (live, or left to recovery)."""
    try:
        return any(is_lock_file(entry.name) for entry in os.scandir(vms_dir))
    except FileNotFoundError:
        return False
