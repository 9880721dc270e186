"""Namespace plumbing that netlink cannot do: bind-mounted namespaces and taps.

pyroute2 0.9.7 does this by forking a child process, synchronously, on the
calling thread (``netns.create``, every ``AsyncIPRoute(netns=...)`` socket,
every tuntap created through such a socket): ~6 ms each with the event loop
blocked, and more as the daemon's heap grows. Network namespaces are
per-thread, so instead one short-lived thread unshares into a new
namespace, pins it with a bind mount, creates the tap there and hands back a
netlink socket opened there; the thread then exits, taking its namespace
membership with it. The whole step costs about a millisecond.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_REC = 16384
_MS_SHARED = 1 << 20
_MNT_DETACH = 2
_TUNSETIFF = 0x400454CA
_TUNSETPERSIST = 0x400454CB
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_NETLINK_ROUTE = 0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


class NamespaceExists(FileExistsError):
    """The namespace's mount point is already there; nothing was made."""


def _check(ret: int, what: str, path: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def _share_run_dir(run_dir: str) -> None:
    # As `ip netns add` does: make the directory a shared mount so namespaces
    # pinned here stay visible from other mount namespaces (systemd units).
    os.makedirs(run_dir, exist_ok=True)
    flags = _MS_SHARED | _MS_REC
    if _libc.mount(b"none", run_dir.encode(), None, flags, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point yet
        _check(-1, "make run dir shared", run_dir)
    _check(
        _libc.mount(run_dir.encode(), run_dir.encode(), b"none", _MS_BIND | _MS_REC, None),
        "bind run dir",
        run_dir,
    )
    _check(
        _libc.mount(b"none", run_dir.encode(), None, flags, None), "make run dir shared", run_dir
    )


def _create_tap(name: str) -> None:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        # Persistent and without owner: QEMU opens it by name later, with its own flags.
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
        fcntl.ioctl(fd, _TUNSETPERSIST, 1)
    finally:
        os.close(fd)


@dataclass
class NewNamespace:
    """What ``make_netns`` hands back; the caller closes both descriptors."""

    netlink: socket.socket  # NETLINK_ROUTE socket inside the namespace
    fd: int  # the namespace itself, for IFLA_NET_NS_FD
    tap_index: int

    def close(self) -> None:
        self.netlink.close()
        os.close(self.fd)


def make_netns(path: str, tap: str) -> NewNamespace:
    """Create and pin a namespace at ``path`` holding a persistent tap, with ip_forward on.

    Must run on a thread of its own that exits afterwards: it leaves the
    calling thread inside the new namespace. All or nothing: on failure the
    namespace is removed before the exception propagates.
    """
    _share_run_dir(os.path.dirname(path))
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError as exc:
        raise NamespaceExists(errno.EEXIST, "namespace already exists", path) from exc
    mounted = False
    try:
        _check(_libc.unshare(_CLONE_NEWNET), "unshare", path)
        _check(
            _libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", _MS_BIND, None),
            "bind namespace",
            path,
        )
        mounted = True
        # /proc/sys/net resolves to the opening thread's namespace: this is the new one.
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
        _create_tap(tap)
        tap_index = socket.if_nametoindex(tap)
        nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE)
        except BaseException:
            os.close(nsfd)
            raise
        return NewNamespace(sock, nsfd, tap_index)
    except BaseException:
        if mounted:
            _libc.umount2(path.encode(), _MNT_DETACH)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise


def remove_netns(path: str) -> bool:
    """Unpin the namespace at ``path``; False if there was none.

    The kernel frees the namespace, and the tap and veth end inside it, once
    no process is left in it: stop the VMM before calling this.
    """
    if _libc.umount2(path.encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        # EINVAL: a mount point left unmounted by a crash half-way through make_netns.
        if err not in (errno.ENOENT, errno.EINVAL):
            _check(-1, "unmount namespace", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def list_netns(run_dir: str) -> list[str]:
    """Names of the namespaces pinned in ``run_dir``."""
    try:
        return os.listdir(run_dir)
    except FileNotFoundError:
        return []


def write_sysctl(path: str, value: str) -> None:
    """Write one /proc/sys value in the calling thread's namespace."""
    with open(path, "w") as f:
        f.write(value)
