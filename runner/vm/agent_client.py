"""Host side of the guest agent channel: transports and an asyncio client.

`AgentClient` owns one reader task (started by `AgentClient.connect`,
cancelled and awaited by `AgentClient.close`) that feeds the sans-I/O
`runner.agent.protocol.Connection`, which decides what each reply means
(which request it ends, whether the conversation allows it); the client only
hands the verdict to whoever waits for that id. A reply the conversation
does not expect is a protocol error: it fails its request (if it names an
outstanding one) and is logged. When the channel closes, every pending
request and running `ExecSession` fails with `AgentDisconnected`.

Env values passed to configure/exec are secrets: they never reach a log line
or an exception message (protocol errors name types, fields and ids only).
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
from typing import Final, Literal, TypeVar

import structlog

from runner.agent import protocol as proto
from runner.agent.protocol import Command
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
    "Command",
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
MAX_LOGGED_PROTOCOL_ERRORS: Final = 20
"""Protocol errors one client logs; a guest gone wrong must not flood the journal."""

log = structlog.get_logger("snapfleet.agent")

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
        self.protocol_errors = 0
        """Replies the conversation did not expect (each failed its request or was logged)."""
        self._reader = reader
        self._writer = writer
        self._conn = proto.Connection(proto.Role.HOST)
        self._ids = itertools.count(1)
        # Who waits for each outstanding id; what a reply means is the connection's call.
        self._waiters: dict[int, asyncio.Future[proto.Message] | ExecSession] = {}
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

    async def exec(self, command: Command) -> ExecSession:
        """Start ``command`` and return its session.

        Returns once the request is sent; a process that fails to start makes
        the session raise `AgentError`.
        """
        exec_id = self._new_id()
        session = ExecSession(self, exec_id)
        self._waiters[exec_id] = session
        try:
            await self._send(proto.Exec.of(exec_id, command))
        except BaseException:
            self._waiters.pop(exec_id, None)
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
            frame = self._conn.send(msg)
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
        """Send ``msg`` and wait for its reply; the connection vouches for the reply's kind."""
        timeout = self.request_timeout if timeout is None else timeout
        future: asyncio.Future[proto.Message] = asyncio.get_running_loop().create_future()
        self._waiters[msg.id] = future
        try:
            await self._send(msg)
            async with asyncio.timeout(timeout):
                answer = await future
        except TimeoutError:
            # Still outstanding for the connection: a late reply is expected, not an error.
            raise AgentTimeout(f"agent did not answer {msg.TYPE} within {timeout}s") from None
        finally:
            if self._waiters.get(msg.id) is future:
                del self._waiters[msg.id]
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warning
            future.cancel()
        assert isinstance(answer, reply), "the connection checked the reply's kind"
        return answer

    async def _read_loop(self) -> None:
        try:
            while data := await self._reader.read(65536):
                await self._receive(data)
            self._fail(AgentDisconnected("agent channel closed"))
        except AgentError as exc:
            self._fail(exc)
        except (ConnectionError, OSError) as exc:
            self._fail(AgentDisconnected(f"agent channel failed: {type(exc).__name__}"))

    async def _receive(self, data: bytes) -> None:
        """Dispatch, in stream order, every event and protocol error ``data`` completes."""
        self._conn.receive_data(data)
        while True:
            try:
                event = self._conn.next_event()
            except proto.AgentProtocolError as exc:
                if self._conn.broken:  # a framing error: nothing after it can be read
                    raise AgentProtocolError(
                        f"agent sent an invalid frame: {exc}", message_id=exc.message_id
                    ) from exc
                self._violation(exc)
                continue
            if event is None:
                return
            await self._dispatch(event)

    async def _dispatch(self, event: proto.Event) -> None:
        """Hand a reply the connection accepted to whoever waits for its id (maybe nobody:
        a request that timed out here is still answered)."""
        if isinstance(event, proto.Hello):
            self.hello = event
            return
        if isinstance(event, proto.Error) and event.id == 0:
            self._report("agent_rejected_a_message", event.message, None)
            return
        if isinstance(event, proto.Output):
            session = self._waiters.get(event.exec_id)
            if isinstance(session, ExecSession):
                await session._add(event)
            return
        waiter = self._waiters.pop(event.id, None)  # any other message ends its request
        if isinstance(event, proto.Error):
            error = AgentError(f"agent error: {event.message}")
            if isinstance(waiter, ExecSession):
                waiter._fail(error)
            elif waiter is not None and not waiter.done():
                waiter.set_exception(error)
        elif isinstance(event, proto.Exited):
            if isinstance(waiter, ExecSession):
                waiter._finish(event)
        elif isinstance(waiter, asyncio.Future) and not waiter.done():
            waiter.set_result(event)

    def _violation(self, exc: proto.AgentProtocolError) -> None:
        """A reply the conversation does not allow: fail its request (if outstanding), log it."""
        waiter = None if exc.message_id is None else self._waiters.pop(exc.message_id, None)
        error = AgentProtocolError(f"agent broke the protocol: {exc.reason}",
                                   message_id=exc.message_id)
        if isinstance(waiter, ExecSession):
            waiter._fail(error)
        elif waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._report("agent_protocol_error", exc.reason, exc.message_id)

    def _report(self, event: str, reason: str, request: int | None) -> None:
        self.protocol_errors += 1
        if self.protocol_errors <= MAX_LOGGED_PROTOCOL_ERRORS:
            log.warning(event, reason=reason[:300], request=request)
        if self.protocol_errors == MAX_LOGGED_PROTOCOL_ERRORS:
            log.warning("agent_protocol_errors_muted", after=MAX_LOGGED_PROTOCOL_ERRORS)

    def _fail(self, exc: AgentError) -> None:
        if self._failure is None:
            self._failure = exc
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            if isinstance(waiter, ExecSession):
                waiter._fail(exc)
            elif not waiter.done():
                waiter.set_exception(exc)
