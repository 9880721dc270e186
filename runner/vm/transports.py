"""Byte streams to a guest agent: how the host reaches the agent in each VMM.

QEMU: a virtio-serial port whose host end is a socket (a socketpair we hand
QEMU, or a unix socket path). Firecracker: its hybrid vsock, a unix socket
that takes `CONNECT <port>` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Protocol

from runner.errors import AgentDisconnected, AgentProtocolError, AgentTimeout


class Transport(Protocol):
    """Opens the byte stream to a guest agent."""

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Return a connected stream pair."""
        ...


class UnixSocketTransport:
    """QEMU: the virtio-serial port's host end is a unix socket chardev (``server=on``).

    Connects as a client, retrying every ``retry_interval`` seconds while the
    socket does not exist or refuses, for up to ``timeout`` seconds.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, timeout: float = 30.0, retry_interval: float = 0.02
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.retry_interval = retry_interval

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect, retrying until the socket accepts or the timeout passes."""
        return await _retry_connect(self.path, self.timeout, self.retry_interval)


class HybridVsockTransport:
    """Firecracker: its vsock device's unix socket plus a ``CONNECT <port>`` handshake.

    Firecracker answers ``OK <host port>`` once the guest accepts, and closes
    the connection when nothing listens yet; that case is retried until
    ``timeout``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        port: int,
        *,
        timeout: float = 30.0,
        retry_interval: float = 0.05,
    ) -> None:
        self.path = os.fspath(path)
        self.port = port
        self.timeout = timeout
        self.retry_interval = retry_interval

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect and complete the handshake, retrying while the guest is not listening."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            remaining = max(0.0, deadline - loop.time())
            reader, writer = await _retry_connect(self.path, remaining, self.retry_interval)
            line = b""
            try:
                line = await self._handshake(reader, writer, deadline)
            finally:
                if not line.startswith(b"OK "):
                    await close_writer(writer)
            if line.startswith(b"OK "):
                return reader, writer
            if line:
                raise AgentProtocolError(f"unexpected answer to CONNECT: {line[:64]!r}")
            if loop.time() >= deadline:
                raise AgentTimeout(f"guest port {self.port} not listening after {self.timeout}s")
            await asyncio.sleep(self.retry_interval)

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, deadline: float
    ) -> bytes:
        """Send CONNECT; return the answer line, or b"" if Firecracker hung up."""
        try:
            writer.write(f"CONNECT {self.port}\n".encode())
            await writer.drain()
            async with asyncio.timeout_at(deadline):
                return await reader.readline()
        except OSError:
            return b""
        except TimeoutError as exc:
            raise AgentTimeout(f"no answer to CONNECT {self.port} on {self.path}") from exc


async def _retry_connect(
    path: str, timeout: float, interval: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await asyncio.open_unix_connection(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if loop.time() >= deadline:
                raise AgentTimeout(f"agent socket {path} not available after {timeout}s") from exc
        except OSError as exc:
            raise AgentDisconnected(f"cannot connect to agent socket {path}: {exc}") from exc
        await asyncio.sleep(interval)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ConnectionError):
        await writer.wait_closed()


class SocketTransport:
    """Agent transport over an already-connected socket (our end of a socketpair)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(sock=self._sock)


