"""The guest agent's wire protocol, without I/O (both ends use it).

A byte stream carries frames::

    u32 length (big-endian, bytes after this field) | u8 kind | payload

* ``FrameKind.MESSAGE``: a UTF-8 JSON object with a ``"type"`` string and an
  integer ``"id"``; bytes fields are base64 strings.
* ``FrameKind.OUTPUT``: ``u32 exec id | u8 stream (1 stdout, 2 stderr) | raw
  bytes``, so job output is never base64'd or re-encoded.

The host sends ``Ping``, ``Configure``, ``Exec``, ``PutFile``, ``Cancel`` and
``Shutdown``; the guest answers with ``Pong``, ``Ok``, ``Output`` frames,
``Exited`` or ``Error`` carrying the request's id (an exec's id is its
request id), and sends ``Hello`` (id 0) whenever it gains a host.

`Connection` turns received bytes into typed events and typed messages into
bytes; it checks every incoming message strictly (unknown type, unknown,
missing or mistyped field, wrong direction) and raises `AgentProtocolError`
naming the type and field, never echoing a value (env values are secrets).
This module imports only the standard library: it is copied into guest images.
"""

from __future__ import annotations

import enum
import struct
from collections import deque

from runner.agent.messages import (  # the protocol's vocabulary, re-exported
    MAX_FRAME_SIZE,
    MAX_ID,
    MAX_OUTPUT_DATA,
    PROTOCOL_VERSION,
    STDERR,
    STDOUT,
    AgentProtocolError,
    Cancel,
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
    "AgentProtocolError",
    "Cancel",
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


# --- the connection -----------------------------------------------------


class Connection:
    """One end of the agent protocol: bytes in → events out, messages in → bytes out.

    ``role`` is the end this object is: a ``Role.GUEST`` connection receives
    host messages and sends guest messages. No I/O, no logging, no threads:
    `send` keeps no state, so several threads may encode with one instance.
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self._peer = Role.HOST if role is Role.GUEST else Role.GUEST
        self._buffer = bytearray()
        self._ready: deque[Event] = deque()
        self._broken: AgentProtocolError | None = None

    @property
    def broken(self) -> bool:
        """True after a framing error: the stream cannot be resynchronised."""
        return self._broken is not None

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> list[Event]:
        """Buffer ``data`` and return every event completed so far, in order.

        An invalid message is consumed and raises `AgentProtocolError`; events
        decoded before it are kept and returned by the next call (pass ``b""``
        to continue). A framing error (oversize, bad kind) breaks the
        connection: every later call raises it again.
        """
        if self._broken is not None:
            raise self._broken
        self._buffer += data
        while (event := self._next_event()) is not None:
            self._ready.append(event)
        events = list(self._ready)
        self._ready.clear()
        return events

    def send(self, message: Event) -> bytes:
        """Encode one message (or `Output`) of this end as a frame."""
        if isinstance(message, Output):
            if self.role is not Role.GUEST:
                raise AgentProtocolError("output frames are sent by the guest only")
            return encode_output(message.exec_id, message.stream, message.data)
        if message.SENDER is not self.role:
            raise AgentProtocolError(
                f"message type {message.TYPE!r} is not sent by the {self.role.value}"
            )
        _check_message(message)
        return _frame(FrameKind.MESSAGE, _encode_message(message))

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
        if kind == FrameKind.MESSAGE:
            return _decode_message(payload, self._peer)
        return self._decode_output(payload)

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
