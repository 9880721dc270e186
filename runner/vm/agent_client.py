"""Host side of the guest agent channel: transports and an asyncio client.

`AgentClient` owns one reader task (started by `AgentClient.connect`,
cancelled and awaited by `AgentClient.close`) that decodes frames with the
sans-I/O `runner.agent.protocol.Connection` and routes replies by request id
and output by exec id. When the channel closes, every pending request and
running `ExecSession` fails with `AgentDisconnected`.

This module never logs: env values passed to configure/exec are secrets and
must not reach a log line or an exception message.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from runner.agent import protocol as proto
from runner.errors import AgentDisconnected, AgentError, AgentProtocolError, AgentTimeout
from runner.vm.transports import (  # re-exported: the client and its transports go together
    HybridVsockTransport,
    SocketTransport,
    Transport,
    UnixSocketTransport,
    close_writer,
)

__all__ = [
    "AgentClient",
    "ExecResult",
    "ExecSession",
    "HybridVsockTransport",
    "OutputChunk",
    "SocketTransport",
    "Transport",
    "UnixSocketTransport",
]

OUTPUT_BUFFER_LIMIT = 4 * 1024 * 1024
"""Unread output (bytes) one session may hold before the client stops reading."""
MAX_PUT_FILE_SIZE = (proto.MAX_FRAME_SIZE - 4096) // 4 * 3
"""Largest ``put_file`` payload: it travels base64'd inside one frame."""
PING_RETRY_INTERVAL = 1.0

_Reply = TypeVar("_Reply", proto.Pong, proto.Ok)


@dataclass(frozen=True)
class OutputChunk:
    """Bytes a job wrote to one of its streams, exactly as written."""

    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class ExecResult:
    """How an exec ended: an exit code, or the signal that killed it."""

    exit_code: int | None
    signal: int | None
    timed_out: bool
    cancelled: bool


class ExecSession:
    """A running exec: iterate it for `OutputChunk`, then `wait` for the result.

    Iterating yields chunks in the order the guest saw them and stops after
    the last one; it raises `AgentError` if the exec failed to start or the
    channel dropped. Unread output beyond `OUTPUT_BUFFER_LIMIT` pauses the
    whole channel until it is read (backpressure reaches the job's pipes);
    calling `wait` without ever iterating discards the output instead.
    """

    def __init__(self, client: AgentClient, exec_id: int) -> None:
        self.id = exec_id
        self._client = client
        self._chunks: deque[OutputChunk] = deque()
        self._buffered = 0
        self._result: ExecResult | None = None
        self._error: AgentError | None = None
        self._changed = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._iterated = False
        self._discard = False
        self._unbounded = False

    @property
    def done(self) -> bool:
        """True once the exec ended (or failed) on the guest side."""
        return self._result is not None or self._error is not None

    def __aiter__(self) -> ExecSession:
        self._iterated = True
        return self

    async def __anext__(self) -> OutputChunk:
        self._iterated = True
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._result is not None:
                raise StopAsyncIteration
            self._changed.clear()
            await self._changed.wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk.data)
        if self._buffered <= OUTPUT_BUFFER_LIMIT // 2:
            self._drained.set()
        return chunk

    async def wait(self) -> ExecResult:
        """Wait for the exec to end; raises `AgentError` if it failed or the channel dropped."""
        if not self._iterated:
            self._discard = True
            self._chunks.clear()
            self._buffered = 0
            self._drained.set()
        while True:
            if self._error is not None:
                raise self._error
            if self._result is not None:
                return self._result
            self._changed.clear()
            await self._changed.wait()

    async def cancel(self, sig: int = signal.SIGTERM) -> None:
        """Signal the exec's process group (SIGKILL follows after a grace period).

        The result then reports ``cancelled=True``. A no-op once the exec ended.
        """
        if self.done:
            return
        self._unbounded = True  # a consumer that stopped reading must not block the reply
        self._drained.set()
        await self._client._request(
            proto.Cancel(self._client._new_id(), exec_id=self.id, signal=int(sig)), proto.Ok
        )

    async def _add(self, data: proto.Output) -> None:
        if self.done or self._discard:
            return
        stream: Literal["stdout", "stderr"] = "stdout" if data.stream == proto.STDOUT else "stderr"
        self._chunks.append(OutputChunk(stream, data.data))
        self._buffered += len(data.data)
        self._changed.set()
        if self._buffered > OUTPUT_BUFFER_LIMIT and not self._unbounded:
            self._drained.clear()
            await self._drained.wait()

    def _finish(self, msg: proto.Exited) -> None:
        self._result = ExecResult(msg.exit_code, msg.signal, msg.timed_out, msg.cancelled)
        self._changed.set()
        self._drained.set()

    def _fail(self, exc: AgentError) -> None:
        if not self.done:
            self._error = exc
        self._changed.set()
        self._drained.set()


class AgentClient:
    """Talks to one guest agent over a `Transport`. Create with `connect`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        request_timeout: float = 60.0,
    ) -> None:
        self.request_timeout = request_timeout
        self.hello: proto.Hello | None = None
        """The last `Hello` the agent sent (a restored clone may send none)."""
        self._reader = reader
        self._writer = writer
        self._proto = proto.Connection(proto.Role.HOST)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[proto.Message]] = {}
        self._sessions: dict[int, ExecSession] = {}
        self._failure: AgentError | None = None
        self._reader_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls, transport: Transport, *, timeout: float = 30.0, request_timeout: float = 60.0
    ) -> AgentClient:
        """Open ``transport`` and wait until the agent answers a ping.

        Pings repeat every second until a `Pong` arrives (a restored guest may
        still be waking up); raises `AgentTimeout` after ``timeout`` seconds.
        """
        client: AgentClient | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await transport.open()
                client = cls(reader, writer, request_timeout=request_timeout)
                client._reader_task = asyncio.create_task(client._read_loop(), name="agent-reader")
                while True:
                    with contextlib.suppress(AgentTimeout):
                        await client.ping(timeout=PING_RETRY_INTERVAL)
                        return client
        except TimeoutError as exc:
            if client is not None:
                await client.close()
            raise AgentTimeout(f"guest agent did not answer within {timeout}s") from exc
        except BaseException:
            if client is not None:
                await client.close()
            raise

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip a ping; return the seconds it took."""
        started = time.monotonic()
        await self._request(proto.Ping(self._new_id()), proto.Pong, timeout=timeout)
        return time.monotonic() - started

    async def configure(
        self,
        *,
        hostname: str | None = None,
        env: Mapping[str, str] | None = None,
        clock_ns: int | None = None,
        entropy: bytes | None = None,
        nameservers: Sequence[str] = (),
    ) -> None:
        """Set the guest's clock, hostname and resolvers, reseed its RNGs, set the job env.

        ``clock_ns`` defaults to the host's ``time.time_ns()``, ``entropy`` to
        64 bytes of ``os.urandom``. ``env`` replaces the env of any earlier
        configure and is merged into every later exec.
        """
        msg = proto.Configure(
            self._new_id(),
            clock_ns=time.time_ns() if clock_ns is None else clock_ns,
            entropy=os.urandom(64) if entropy is None else entropy,
            hostname=hostname,
            env=dict(env or {}),
            nameservers=list(nameservers),
        )
        await self._request(msg, proto.Ok)

    async def exec(
        self,
        argv: Sequence[str] | None = None,
        *,
        script: str | None = None,
        shell: str = "/bin/sh",
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
    ) -> ExecSession:
        """Start ``argv`` (or ``script`` run by ``shell``) and return its session.

        Returns once the request is sent; a process that fails to start makes
        the session raise `AgentError`. ``timeout`` (seconds) is enforced by the
        guest, which kills the process group and reports ``timed_out``.
        """
        if (argv is None) == (script is None):
            raise ValueError("exactly one of argv and script is required")
        if argv is not None and (isinstance(argv, str) or not argv):
            raise ValueError("argv must be a non-empty sequence of strings")
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be positive")
        exec_id = self._new_id()
        msg = proto.Exec(
            exec_id,
            argv=None if argv is None else list(argv),
            script=script,
            shell=shell,
            env=dict(env or {}),
            cwd=cwd,
            timeout=timeout,
            stdin=stdin,
        )
        session = ExecSession(self, exec_id)
        self._sessions[exec_id] = session
        try:
            await self._send(msg)
        except BaseException:
            self._sessions.pop(exec_id, None)
            raise
        return session

    async def put_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the guest (parents created, atomic, ``mode``)."""
        if len(data) > MAX_PUT_FILE_SIZE:
            raise ValueError(
                f"put_file data is {len(data)} bytes; the limit is {MAX_PUT_FILE_SIZE}"
            )
        await self._request(proto.PutFile(self._new_id(), path, data, mode), proto.Ok)

    async def shutdown(self) -> None:
        """Ask the guest to sync and power off; the channel closing counts as done."""
        with contextlib.suppress(AgentDisconnected):
            await self._request(proto.Shutdown(self._new_id()), proto.Ok)

    async def close(self) -> None:
        """Stop the reader task, close the stream, fail whatever still waits. Idempotent."""
        task, self._reader_task = self._reader_task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        self._fail(AgentDisconnected("agent client closed"))
        await close_writer(self._writer)

    # -- internals --------------------------------------------------------

    def _new_id(self) -> int:
        request_id = next(self._ids)
        if request_id > proto.MAX_ID:
            raise AgentError("request ids exhausted; reconnect")
        return request_id

    async def _send(self, msg: proto.Message) -> None:
        if self._failure is not None:
            raise AgentDisconnected(f"agent channel is closed ({self._failure})")
        try:
            frame = self._proto.send(msg)
        except proto.AgentProtocolError as exc:
            raise AgentProtocolError(exc.reason, message_id=exc.message_id) from exc
        try:
            self._writer.write(frame)
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise AgentDisconnected(f"agent channel failed: {type(exc).__name__}") from exc

    async def _request(
        self, msg: proto.Message, reply: type[_Reply], *, timeout: float | None = None
    ) -> _Reply:
        timeout = self.request_timeout if timeout is None else timeout
        future: asyncio.Future[proto.Message] = asyncio.get_running_loop().create_future()
        self._pending[msg.id] = future
        try:
            await self._send(msg)
            async with asyncio.timeout(timeout):
                answer = await future
        except TimeoutError:
            raise AgentTimeout(f"agent did not answer {msg.TYPE} within {timeout}s") from None
        finally:
            self._pending.pop(msg.id, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warning
            future.cancel()
        if not isinstance(answer, reply):
            raise AgentProtocolError(f"agent answered {msg.TYPE} with {answer.TYPE}")
        return answer

    async def _read_loop(self) -> None:
        try:
            while data := await self._reader.read(65536):
                try:
                    events = self._proto.receive_data(data)
                except proto.AgentProtocolError as exc:
                    raise AgentProtocolError(
                        f"agent sent an invalid frame: {exc}", message_id=exc.message_id
                    ) from exc
                for event in events:
                    await self._dispatch(event)
            self._fail(AgentDisconnected("agent channel closed"))
        except AgentError as exc:
            self._fail(exc)
        except (ConnectionError, OSError) as exc:
            self._fail(AgentDisconnected(f"agent channel failed: {type(exc).__name__}"))

    async def _dispatch(self, event: proto.Event) -> None:
        if isinstance(event, proto.Output):
            session = self._sessions.get(event.exec_id)
            if session is not None:  # unknown: output of an earlier host's exec
                await session._add(event)
        elif isinstance(event, proto.Hello):
            self.hello = event
        elif isinstance(event, proto.Exited):
            session = self._sessions.pop(event.id, None)
            if session is not None:
                session._finish(event)
        elif isinstance(event, proto.Error):
            error = AgentError(f"agent error: {event.message}")
            if (future := self._pending.get(event.id)) is not None and not future.done():
                future.set_exception(error)
            elif (session := self._sessions.pop(event.id, None)) is not None:
                session._fail(error)
        elif (future := self._pending.get(event.id)) is not None and not future.done():
            future.set_result(event)

    def _fail(self, exc: AgentError) -> None:
        if self._failure is None:
            self._failure = exc
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        for session in self._sessions.values():
            session._fail(exc)
        self._sessions.clear()
