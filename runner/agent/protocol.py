"""The guest agent's wire protocol, without I/O (both ends use it).

A byte stream carries frames::

    u32 length (big-endian, bytes after this field) | u8 kind | payload

* ``FrameKind.MESSAGE``: a UTF-8 JSON object with a ``"type"`` string and an
  integer ``"id"``; bytes fields are base64 strings.
* ``FrameKind.OUTPUT``: ``u32 exec id | u8 stream (1 stdout, 2 stderr) | raw
  bytes``, so job output is never base64'd or re-encoded.

The host sends requests: ``Ping``, ``Configure``, ``Exec``, ``PutFile``,
``Cancel`` and ``Shutdown``, each with an id of its own (1..2**32-1; an
exec's id names its output). The guest answers each with exactly one of
``Pong`` (to a ping), ``Ok`` (to the others but exec), ``Exited`` (an exec,
after its ``Output`` frames) or ``Error``. Id 0 is the connection's own: the
guest sends ``Hello`` (id 0) whenever it gains a host, and ``Error`` with id
0 about a message whose id it could not read.

`Connection` turns received bytes into typed events (`Connection.receive_data`,
then `Connection.next_event` until it returns None, as h11 does) and typed
messages into bytes (`Connection.send`), and tracks the conversation: every
outstanding request and where it stands, moved by one table (`TRANSITIONS`)
for messages sent and received alike, so both ends hold the same view. It
checks every incoming message strictly (unknown type, unknown, missing or
mistyped field, wrong direction, a reply or output the conversation does not
expect) and raises `AgentProtocolError` naming the type, field or request id,
never echoing a value (env values are secrets).
This module imports only the standard library: it is copied into guest images.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from runner.agent.messages import (  # the protocol's vocabulary, re-exported
    MAX_FRAME_SIZE,
    MAX_ID,
    MAX_OUTPUT_DATA,
    PROTOCOL_VERSION,
    STDERR,
    STDOUT,
    AgentProtocolError,
    Cancel,
    Command,
    Configure,
    Error,
    Event,
    Exec,
    Exited,
    Hello,
    Message,
    Ok,
    Output,
    Ping,
    Pong,
    PutFile,
    Role,
    Shutdown,
    _check_message,
    _decode_message,
    _encode_message,
)

__all__ = [
    "MAX_FRAME_SIZE",
    "MAX_ID",
    "MAX_OUTPUT_DATA",
    "PROTOCOL_VERSION",
    "STDERR",
    "STDOUT",
    "TRANSITIONS",
    "AgentProtocolError",
    "Cancel",
    "Command",
    "Configure",
    "Connection",
    "Error",
    "Event",
    "Exec",
    "Exited",
    "FrameKind",
    "Hello",
    "Message",
    "Ok",
    "Output",
    "Ping",
    "Pong",
    "PutFile",
    "RequestState",
    "Role",
    "Shutdown",
    "encode_output",
]

_FRAME_HEADER = struct.Struct(">IB")
_OUTPUT_HEADER = struct.Struct(">IB")


class FrameKind(enum.IntEnum):
    """The byte after a frame's length."""

    MESSAGE = 1
    OUTPUT = 2


def _frame(kind: FrameKind, payload: bytes) -> bytes:
    if len(payload) + 1 > MAX_FRAME_SIZE:
        raise AgentProtocolError(
            f"frame of {len(payload) + 1} bytes exceeds the maximum of {MAX_FRAME_SIZE}"
        )
    return _FRAME_HEADER.pack(len(payload) + 1, kind) + payload


# --- the conversation ----------------------------------------------------


class RequestState(enum.Enum):
    """Where one request stands; `Connection.state` of an id."""

    IDLE = "idle"
    """No such request is outstanding (never started, or ended)."""
    AWAITING_PONG = "awaiting pong"
    AWAITING_OK = "awaiting ok"
    RUNNING = "running"
    """An exec: ``Output`` frames, then ``Exited`` (or ``Error``)."""
    REJECTED = "rejected"
    """The guest found the request invalid: only its ``Error`` reply ends it."""
    DONE = "done"
    """Ended; the id leaves the table (it reads as `IDLE` again)."""


_S = RequestState

TRANSITIONS: Final[dict[tuple[RequestState, type[Event]], RequestState]] = {
    # A request starts (host → guest).
    (_S.IDLE, Ping): _S.AWAITING_PONG,
    (_S.IDLE, Configure): _S.AWAITING_OK,
    (_S.IDLE, PutFile): _S.AWAITING_OK,
    (_S.IDLE, Cancel): _S.AWAITING_OK,
    (_S.IDLE, Shutdown): _S.AWAITING_OK,
    (_S.IDLE, Exec): _S.RUNNING,
    # It is answered (guest → host).
    (_S.AWAITING_PONG, Pong): _S.DONE,
    (_S.AWAITING_PONG, Error): _S.DONE,
    (_S.AWAITING_OK, Ok): _S.DONE,
    (_S.AWAITING_OK, Error): _S.DONE,
    (_S.RUNNING, Output): _S.RUNNING,
    (_S.RUNNING, Exited): _S.DONE,
    (_S.RUNNING, Error): _S.DONE,
    (_S.REJECTED, Error): _S.DONE,
}
"""Every move a request may make: (state, message type) → next state.

One table for both ends and both directions: a message is checked against it
when it is sent and when it is received. Any pair not in it is a protocol
error. `Hello` and an `Error` with id 0 concern the connection, not a
request, and are outside it.
"""


@dataclass(frozen=True)
class _Request:
    kind: str  # the request's message type, for error messages
    state: RequestState


def _event_id(event: Event) -> int:
    return event.exec_id if isinstance(event, Output) else event.id


def _event_name(event: Event) -> str:
    return "output" if isinstance(event, Output) else event.TYPE


def _unexpected(event: Event, rid: int, request: _Request | None) -> str:
    """Why ``event`` has no move from where request ``rid`` stands (ids and types only)."""
    name = _event_name(event)
    if request is None:
        return f"{name} for request {rid}, which is not outstanding"
    if (RequestState.IDLE, type(event)) in TRANSITIONS:  # it starts a request
        return f"{name} reuses id {rid} of an outstanding {request.kind}"
    return f"{name} for request {rid} ({request.kind}, {request.state.value})"


class Connection:
    """One end of the agent protocol: bytes in → events out, messages in → bytes out.

    ``role`` is the end this object is: a ``Role.GUEST`` connection receives
    host messages and sends guest messages. Both `send` and `next_event`
    move the requests they concern through `TRANSITIONS`; a message that
    breaks the table is refused (`send`) or raised (`next_event`).
    No I/O, no logging, no threads: callers that send from several threads
    hold one lock around every call.
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self._peer = Role.HOST if role is Role.GUEST else Role.GUEST
        self._buffer = bytearray()
        self._broken: AgentProtocolError | None = None
        self._requests: dict[int, _Request] = {}

    @property
    def broken(self) -> bool:
        """True after a framing error: the stream cannot be resynchronised."""
        return self._broken is not None

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return len(self._buffer)

    def state(self, request_id: int) -> RequestState:
        """Where request ``request_id`` stands (`RequestState.IDLE` if not outstanding)."""
        request = self._requests.get(request_id)
        return RequestState.IDLE if request is None else request.state

    @property
    def outstanding(self) -> dict[int, RequestState]:
        """Every request that has not ended, by id (a copy)."""
        return {rid: request.state for rid, request in self._requests.items()}

    def receive_data(self, data: bytes) -> None:
        """Buffer ``data``; `next_event` then returns what it completes."""
        if self._broken is not None:
            raise self._broken
        self._buffer += data

    def next_event(self) -> Event | None:
        """The next event received, in stream order; None until more data arrives.

        An invalid message is consumed and raises `AgentProtocolError` (call
        again to go on). Its ``message_id`` is the offending message's id when
        it could be read, and that request has failed: on a host connection it
        is no longer outstanding (it gets no other reply); on a guest
        connection it is `RequestState.REJECTED`, awaiting the guest's
        `Error`. A framing error (oversize, bad kind) breaks the connection:
        every later call raises it again.
        """
        if self._broken is not None:
            raise self._broken
        return self._next_event()

    def send(self, message: Event) -> bytes:
        """Encode one message (or `Output`) of this end as a frame.

        Raises `AgentProtocolError`, and changes nothing, if the message is
        not this end's to send or the conversation does not allow it now.
        """
        if isinstance(message, Output):
            if self.role is not Role.GUEST:
                raise AgentProtocolError("output frames are sent by the guest only")
            frame = encode_output(message.exec_id, message.stream, message.data)
        else:
            if message.SENDER is not self.role:
                raise AgentProtocolError(
                    f"message type {message.TYPE!r} is not sent by the {self.role.value}"
                )
            _check_message(message)
            frame = _frame(FrameKind.MESSAGE, _encode_message(message))
        self._advance(message)
        return frame

    # -- the table --------------------------------------------------------

    def _advance(self, event: Event) -> None:
        """Move the request ``event`` concerns, or raise without changing anything."""
        rid = _event_id(event)
        name = _event_name(event)
        if isinstance(event, Hello):
            if rid != 0:
                raise AgentProtocolError("hello.id: must be 0", message_id=rid)
            return  # the connection's own messages
        if isinstance(event, Error) and rid == 0:
            return
        if rid == 0:
            raise AgentProtocolError(f"{name}.id: 0 is reserved for the connection", message_id=0)
        request = self._requests.get(rid)
        state = RequestState.IDLE if request is None else request.state
        new = TRANSITIONS.get((state, type(event)))
        if new is None:
            raise AgentProtocolError(_unexpected(event, rid, request), message_id=rid)
        if isinstance(event, Cancel):
            target = self._requests.get(event.exec_id)
            if target is not None and target.state is not RequestState.RUNNING:
                raise AgentProtocolError(
                    f"cancel.exec_id: request {event.exec_id} is not a running exec"
                    f" ({target.kind}, {target.state.value})",
                    message_id=rid,
                )
        if new is RequestState.DONE:
            del self._requests[rid]
        elif request is None:
            self._requests[rid] = _Request(name, new)
        elif new is not state:
            self._requests[rid] = _Request(request.kind, new)

    def _fail(self, exc: AgentProtocolError) -> AgentProtocolError:
        """Fail the request a received message broke the rules for: see `next_event`."""
        rid = exc.message_id
        if rid is None or rid == 0:
            return exc
        if self.role is Role.HOST:
            self._requests.pop(rid, None)
        else:
            request = self._requests.get(rid)
            kind = "request" if request is None else request.kind
            self._requests[rid] = _Request(kind, RequestState.REJECTED)
        return exc

    # -- framing ----------------------------------------------------------

    def _next_event(self) -> Event | None:
        if len(self._buffer) < _FRAME_HEADER.size:
            return None
        length, kind = _FRAME_HEADER.unpack_from(self._buffer)
        if not 1 <= length <= MAX_FRAME_SIZE:
            self._broken = AgentProtocolError(f"frame length {length} outside 1..{MAX_FRAME_SIZE}")
            raise self._broken
        if kind not in (FrameKind.MESSAGE, FrameKind.OUTPUT):
            self._broken = AgentProtocolError(f"unknown frame kind {kind}")
            raise self._broken
        end = 4 + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[_FRAME_HEADER.size : end])
        del self._buffer[:end]
        try:
            if kind == FrameKind.MESSAGE:
                event: Event = _decode_message(payload, self._peer)
            else:
                event = self._decode_output(payload)
            self._advance(event)
        except AgentProtocolError as exc:
            raise self._fail(exc) from None
        return event

    def _decode_output(self, payload: bytes) -> Output:
        if self._peer is not Role.GUEST:
            raise AgentProtocolError("output frames are sent by the guest only")
        if len(payload) < _OUTPUT_HEADER.size:
            raise AgentProtocolError("output frame shorter than its header")
        exec_id, stream = _OUTPUT_HEADER.unpack_from(payload)
        if stream not in (STDOUT, STDERR):
            raise AgentProtocolError(f"output.stream: unknown stream {stream}", message_id=exec_id)
        return Output(exec_id, stream, payload[_OUTPUT_HEADER.size :])


def encode_output(exec_id: int, stream: int, data: bytes) -> bytes:
    """Encode one output chunk (at most `MAX_OUTPUT_DATA` bytes) as a frame."""
    if not 0 <= exec_id <= MAX_ID:
        raise AgentProtocolError("output.exec_id: must be within 0..2**32-1")
    if stream not in (STDOUT, STDERR):
        raise AgentProtocolError("output.stream: must be 1 (stdout) or 2 (stderr)")
    return _frame(FrameKind.OUTPUT, _OUTPUT_HEADER.pack(exec_id, stream) + data)
