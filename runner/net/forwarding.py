"""Host ip_forward: on while some clone needs it, then back to what it was.

Several Snapfleet instances may share a host (and its network namespace), so
the switch is shared: each instance that needs forwarding holds a marker file
locked with ``flock`` for as long as it does. The first one in saves the value
it found; the last one out (no other marker still locked: a crashed holder's
lock is gone with it) puts that value back. One lock file serialises the
bookkeeping. The registry is per network namespace (ip_forward is), named by
the namespace's inode.

Blocking file I/O: call through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
REGISTRY_ROOT = Path("/run/snapfleet-forward")


def _registry(root: Path) -> Path:
    return root / str(os.stat("/proc/thread-self/ns/net").st_ino)


class ForwardingLease:
    """One instance's claim on ip_forward. ``acquire``/``release`` are idempotent."""

    def __init__(self, owner: str, *, root: Path = REGISTRY_ROOT, sysctl: str = IP_FORWARD):
        self._owner = owner
        self._root = root
        self._sysctl = sysctl
        self._marker: int | None = None
        self._path: Path | None = None

    @property
    def held(self) -> bool:
        return self._marker is not None

    def acquire(self) -> None:
        """Turn ip_forward on (saving the old value if we are the first holder)."""
        if self._marker is not None:
            return
        registry = _registry(self._root)
        registry.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(registry / "lock"):
            saved = registry / "saved"
            # A saved value left by a holder that crashed is still the value
            # from before any Snapfleet instance: keep it.
            if not saved.exists():
                saved.write_text(_read(self._sysctl))
            path = registry / f"holder.{self._owner}.{os.getpid()}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _write(self._sysctl, "1")
            self._marker, self._path = fd, path

    def release(self) -> bool:
        """Drop our claim; restore the saved value if nobody else holds one.

        Returns True when ip_forward was put back.
        """
        if self._marker is None or self._path is None:
            return False
        registry = self._path.parent
        with _locked(registry / "lock"):
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
            os.close(self._marker)
            self._marker = self._path = None
            if _others_hold(registry):
                return False
            saved = registry / "saved"
            try:
                _write(self._sysctl, saved.read_text().strip() or "0")
            except FileNotFoundError:
                return False
            saved.unlink()
            return True


def _others_hold(registry: Path) -> bool:
    """Whether any live holder remains; stale markers (their owner died) are removed."""
    held = False
    for marker in registry.glob("holder.*"):
        try:
            fd = os.open(marker, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = True
            continue
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
    return held


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)
