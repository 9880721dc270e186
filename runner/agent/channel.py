"""Byte channels between the agent and its host.

The channel may lose its host at any time (a snapshot restored into a new
QEMU process, a host-side reconnect). Then reads return EOF: the agent calls
`Channel.drop`, waits for a host again with `Channel.wait_host`, and starts a
fresh session. A channel never makes the agent exit.

`PortChannel` is the virtio-serial port used in QEMU guests; `SocketChannel`
serves a unix socket (tests on the host) or a vsock (Firecracker).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from runner.agent.log import log

PORT_NAME = "org.snapfleet.agent"
READ_CHUNK = 64 * 1024
RECONNECT_DELAY = 0.008


class Channel:
    """A byte stream to the host that can lose its host and gain a new one."""

    def wait_host(self) -> None:
        """Block until a host is (probably) there."""

    def read(self) -> bytes:
        """Block for data; ``b""`` means the host went away."""
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        """Write all of ``data``; may block while the host is slow to read.

        With no host, the frame is dropped: it belonged to one that left.
        """
        raise NotImplementedError

    def drop(self) -> None:
        """Forget the current host after EOF."""


class PortChannel(Channel):
    """A virtio-serial port (``/dev/vportNpM``).

    With no host connected, read() returns 0 at once, poll() reports POLLHUP
    and write() would block until a host connects, so `write` checks first.
    """

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    def wait_host(self) -> None:
        while any(ev & select.POLLHUP for _, ev in self._poll.poll(0)):
            time.sleep(RECONNECT_DELAY)

    def read(self) -> bytes:
        try:
            return os.read(self._fd, READ_CHUNK)
        except OSError as exc:
            log(f"port read failed: {exc}")
            return b""

    def write(self, data: bytes) -> None:
        if any(ev & select.POLLHUP for _, ev in self._poll.poll(0)):
            return  # no host: do not hand this frame to the next one
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            log(f"port write failed, frame dropped: {exc}")

    def drop(self) -> None:
        time.sleep(RECONNECT_DELAY)


class SocketChannel(Channel):
    """A stream socket; for tests on the host (unix) or Firecracker (vsock).

    ``listener`` set: accept one host at a time. Otherwise ``connect`` is
    called (and retried) to reach a listening host.
    """

    def __init__(
        self,
        listener: socket.socket | None = None,
        connect: Callable[[], socket.socket] | None = None,
    ) -> None:
        self._listener = listener
        self._connect = connect
        self._conn: socket.socket | None = None
        self._lock = threading.Lock()

    def wait_host(self) -> None:
        conn = None
        while conn is None:
            try:
                if self._listener is not None:
                    conn, _ = self._listener.accept()
                elif self._connect is not None:
                    conn = self._connect()
            except OSError:
                time.sleep(0.1)
        with self._lock:
            self._conn = conn

    def read(self) -> bytes:
        conn = self._conn
        if conn is None:
            return b""
        try:
            return conn.recv(READ_CHUNK)
        except OSError:
            return b""

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._conn is None:
                return  # a frame for a host that just left is dropped, like its session
            with contextlib.suppress(OSError):
                self._conn.sendall(data)

    def drop(self) -> None:
        conn = self._conn
        if conn is None:
            return
        # shutdown() first wakes a writer blocked in sendall() on this socket.
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        with self._lock:
            conn.close()
            self._conn = None


def find_port(name: str = PORT_NAME) -> str | None:
    """The ``/dev/vportNpM`` whose virtio-serial name is ``name``, if any."""
    for name_file in sorted(Path("/sys/class/virtio-ports").glob("vport*/name")):
        with contextlib.suppress(OSError):
            if name_file.read_text().strip() == name:
                return f"/dev/{name_file.parent.name}"
    return None
