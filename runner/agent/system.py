"""Operations on the guest system itself: clock, RNG, hostname, files, power.

These need root in a VM; the agent skips the clock, RNG and hostname when run
on a developer's host (``--no-system``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import random
import socket
import struct
import tempfile
import time
import uuid
from pathlib import Path

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
RB_POWER_OFF = 0x4321FEDC


RESOLV_CONF = "/etc/resolv.conf"


def configure(
    clock_ns: int, entropy: bytes, hostname: str | None, nameservers: list[str] | None = None
) -> None:
    """Set the wall clock, reseed the RNGs (if given entropy), hostname and resolvers."""
    time.clock_settime_ns(time.CLOCK_REALTIME, clock_ns)
    if entropy:
        add_entropy(entropy)
        reseed_userspace(entropy)
    if hostname is not None:
        socket.sethostname(hostname)
    if nameservers:
        lines = "".join(f"nameserver {server}\n" for server in nameservers)
        put_file(RESOLV_CONF, f"# written by snapfleet for this job\n{lines}".encode(), 0o644)


def reseed_userspace(entropy: bytes) -> None:
    """Reseed this process's PRNGs: every clone resumes with the template's state.

    ``random`` is reseeded from the fresh entropy, and tempfile's name
    generator (a ``random.Random`` it made once, in the template) is dropped so
    the next temporary name comes from a generator seeded after the restore.
    """
    random.seed(entropy)
    tempfile._name_sequence = None  # type: ignore[attr-defined]  # no public way to reset it


def add_entropy(entropy: bytes) -> None:
    """Mix host entropy into the kernel pool, credit it, and reseed the CRNG now.

    Crediting alone is not enough once the CRNG is initialised: the kernel only
    reseeds on its own schedule (up to a minute later), so clones restored from
    one snapshot would keep producing the same random bytes until then.
    """
    info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def put_file(path: str, data: bytes, mode: int) -> None:
    """Write ``path`` atomically (temp file, fsync, rename), creating its parents."""
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def power_off() -> None:
    """Power the machine off now; raises `OSError` if the kernel refuses.

    On success this does not return. Call ``os.sync()`` first.
    """
    libc = ctypes.CDLL(None, use_errno=True)  # find_library() would spawn ldconfig
    if libc.reboot(RB_POWER_OFF) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def boot_id() -> str:
    """The kernel's boot id (a random one if /proc does not have it)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return str(uuid.uuid4())
