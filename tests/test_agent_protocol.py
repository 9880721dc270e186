"""The agent wire protocol with two in-memory ends: no sockets, no processes."""

from __future__ import annotations

import json
import struct

import pytest

from runner.agent import messages
from runner.agent import protocol as proto
from runner.agent.protocol import (
    MAX_FRAME_SIZE,
    MAX_OUTPUT_DATA,
    AgentProtocolError,
    Connection,
    FrameKind,
    Role,
)

HOST_MESSAGES: list[proto.Message] = [
    proto.Ping(1),
    proto.Configure(2, clock_ns=1_700_000_000_123_456_789, entropy=bytes(range(64))),
    proto.Configure(3, clock_ns=0, entropy=b"", hostname="job-7", env={"TOKEN": "s3cr3t", "A": ""}),
    proto.Exec(4, argv=["echo", "hi there", "ünï"]),
    proto.Exec(
        5,
        script="set -e\necho $X\n",
        shell="/bin/bash",
        env={"X": "1"},
        cwd="/work",
        timeout=2.5,
        stdin=b"\x00\xffdata",
    ),
    proto.PutFile(6, "/etc/snapfleet/x", b"\x00\x01binary\xff", 0o600),
    proto.Cancel(7, exec_id=5, signal=9),
    proto.Shutdown(8),
]
GUEST_MESSAGES: list[proto.Event] = [
    proto.Hello(0, proto.PROTOCOL_VERSION, "0b6f4c1e-boot"),
    proto.Pong(1),
    proto.Ok(2),
    proto.Exited(5, exit_code=3, signal=None, timed_out=False, cancelled=False),
    proto.Exited(5, exit_code=None, signal=9, timed_out=True, cancelled=True),
    proto.Error(9, "no such thing"),
    proto.Output(5, proto.STDOUT, b"line\n"),
    proto.Output(5, proto.STDERR, b"\xff\xfe not utf-8 \x00\x80"),
    proto.Output(4_294_967_295, proto.STDOUT, b""),
]


def message_frame(obj: object, *, kind: int = FrameKind.MESSAGE) -> bytes:
    """A frame holding exactly this JSON (valid or not), bypassing the encoder."""
    payload = json.dumps(obj).encode()
    return struct.pack(">IB", len(payload) + 1, kind) + payload


def raw_frame(payload: bytes, kind: int = FrameKind.MESSAGE) -> bytes:
    return struct.pack(">IB", len(payload) + 1, kind) + payload


@pytest.fixture
def host() -> Connection:
    return Connection(Role.HOST)


@pytest.fixture
def guest() -> Connection:
    return Connection(Role.GUEST)


@pytest.mark.parametrize("message", HOST_MESSAGES, ids=lambda m: type(m).__name__)
def test_host_messages_round_trip(
    host: Connection, guest: Connection, message: proto.Message
) -> None:
    assert guest.receive_data(host.send(message)) == [message]
    assert guest.buffered == 0


@pytest.mark.parametrize("message", GUEST_MESSAGES, ids=lambda m: type(m).__name__)
def test_guest_messages_round_trip(
    host: Connection, guest: Connection, message: proto.Event
) -> None:
    assert host.receive_data(guest.send(message)) == [message]


def test_every_message_type_is_covered() -> None:
    sent = {type(m) for m in [*HOST_MESSAGES, *GUEST_MESSAGES]}
    assert sent == {*messages._MESSAGE_TYPES.values(), proto.Output}


def test_partial_frames_byte_by_byte(host: Connection, guest: Connection) -> None:
    stream = b"".join(guest.send(m) for m in GUEST_MESSAGES)
    events: list[proto.Event] = []
    for i in range(len(stream)):
        events += host.receive_data(stream[i : i + 1])
    assert events == GUEST_MESSAGES
    assert host.buffered == 0


def test_many_frames_in_one_chunk(host: Connection, guest: Connection) -> None:
    stream = b"".join(host.send(m) for m in HOST_MESSAGES)
    assert guest.receive_data(stream[:-3]) == HOST_MESSAGES[:-1]
    assert guest.receive_data(stream[-3:]) == HOST_MESSAGES[-1:]


def test_output_bytes_exact(host: Connection, guest: Connection) -> None:
    data = bytes(range(256)) * 10
    frame = guest.send(proto.Output(42, proto.STDERR, data))
    assert data in frame  # raw, not base64
    (event,) = host.receive_data(frame)
    assert event == proto.Output(42, proto.STDERR, data)


def test_largest_output_fits(host: Connection, guest: Connection) -> None:
    data = b"x" * MAX_OUTPUT_DATA
    (event,) = host.receive_data(guest.send(proto.Output(1, proto.STDOUT, data)))
    assert isinstance(event, proto.Output)
    assert event.data == data
    with pytest.raises(AgentProtocolError, match="exceeds"):
        guest.send(proto.Output(1, proto.STDOUT, data + b"x"))


def test_oversize_frame_breaks_the_connection(guest: Connection) -> None:
    header = struct.pack(">IB", MAX_FRAME_SIZE + 1, FrameKind.MESSAGE)
    with pytest.raises(AgentProtocolError, match="frame length"):
        guest.receive_data(header)
    assert guest.broken
    with pytest.raises(AgentProtocolError, match="frame length"):
        guest.receive_data(b"")


def test_unknown_frame_kind(guest: Connection) -> None:
    with pytest.raises(AgentProtocolError, match="frame kind 7"):
        guest.receive_data(raw_frame(b"{}", kind=7))


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe{}", "not valid UTF-8 JSON"),
        (b'{"type": "ping", "id": NaN}', "not valid UTF-8 JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"id": 1}', "message.type"),
    ],
)
def test_bad_json(guest: Connection, payload: bytes, match: str) -> None:
    with pytest.raises(AgentProtocolError, match=match):
        guest.receive_data(raw_frame(payload))


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"type": "launch_missiles", "id": 3}, "unknown message type 'launch_missiles'"),
        ({"type": "pong", "id": 3}, "'pong' is not sent by the host"),
        ({"type": "ping"}, r"ping\.id: missing"),
        ({"type": "ping", "id": "3"}, r"ping\.id: expected int"),
        ({"type": "ping", "id": True}, r"ping\.id: expected int"),
        ({"type": "ping", "id": -1}, r"ping\.id: must be within"),
        ({"type": "ping", "id": 3, "extra": 1}, r"ping: unknown field\(s\) extra"),
        ({"type": "exec", "id": 3, "argv": ["a", 1]}, r"exec\.argv: expected list\[str\] or null"),
        ({"type": "exec", "id": 3}, r"exec\.argv: exactly one of argv and script"),
        ({"type": "exec", "id": 3, "argv": []}, r"exec\.argv: must not be empty"),
        ({"type": "exec", "id": 3, "argv": ["x"], "timeout": "1"}, r"exec\.timeout: expected"),
        ({"type": "exec", "id": 3, "argv": ["x"], "timeout": 0}, r"exec\.timeout: must be pos"),
        ({"type": "exec", "id": 3, "argv": ["x"], "stdin": "***"}, r"exec\.stdin: expected base64"),
        ({"type": "configure", "id": 3, "entropy": ""}, r"configure\.clock_ns: missing"),
        (
            {"type": "configure", "id": 3, "clock_ns": 1, "entropy": "", "env": {"K": 1}},
            r"configure\.env: expected dict\[str, str\]",
        ),
        ({"type": "put_file", "id": 3, "path": "rel", "data": ""}, r"put_file\.path: must be abs"),
        ({"type": "cancel", "id": 3, "exec_id": 1, "signal": 99}, r"cancel\.signal"),
    ],
)
def test_invalid_messages_name_the_problem(guest: Connection, obj: object, match: str) -> None:
    with pytest.raises(AgentProtocolError, match=match) as info:
        guest.receive_data(message_frame(obj))
    assert not guest.broken
    if isinstance(obj, dict) and type(obj.get("id")) is int and obj["id"] >= 0:
        assert info.value.message_id == obj["id"]


def test_errors_never_echo_values(guest: Connection) -> None:
    secret = "hunter2-very-secret"
    bad = {"type": "configure", "id": 1, "clock_ns": 1, "entropy": "", "env": {"K": [secret]}}
    with pytest.raises(AgentProtocolError) as info:
        guest.receive_data(message_frame(bad))
    assert secret not in str(info.value)


def test_stream_continues_after_an_invalid_message(host: Connection, guest: Connection) -> None:
    stream = host.send(proto.Ping(1)) + message_frame({"type": "nope", "id": 2})
    stream += host.send(proto.Ping(3))
    with pytest.raises(AgentProtocolError, match="nope"):
        guest.receive_data(stream)
    assert guest.receive_data(b"") == [proto.Ping(1), proto.Ping(3)]


def test_host_rejects_output_from_itself_and_guest_rejects_output(host: Connection) -> None:
    with pytest.raises(AgentProtocolError, match="guest only"):
        host.send(proto.Output(1, proto.STDOUT, b""))
    guest = Connection(Role.GUEST)
    with pytest.raises(AgentProtocolError, match="guest only"):
        guest.receive_data(raw_frame(struct.pack(">IB", 1, 1), kind=FrameKind.OUTPUT))


def test_bad_output_frames(host: Connection) -> None:
    with pytest.raises(AgentProtocolError, match="shorter than its header"):
        host.receive_data(raw_frame(b"\x00\x00", kind=FrameKind.OUTPUT))
    with pytest.raises(AgentProtocolError, match="unknown stream 3"):
        host.receive_data(raw_frame(struct.pack(">IB", 1, 3) + b"x", kind=FrameKind.OUTPUT))


def test_send_checks_direction_and_fields(host: Connection, guest: Connection) -> None:
    with pytest.raises(AgentProtocolError, match="'pong' is not sent by the host"):
        host.send(proto.Pong(1))
    with pytest.raises(AgentProtocolError, match="exactly one of argv and script"):
        host.send(proto.Exec(1, argv=["a"], script="b"))
    with pytest.raises(AgentProtocolError, match="id: must be within"):
        guest.send(proto.Ok(2**32))


def test_frame_layout(host: Connection) -> None:
    frame = host.send(proto.Ping(7))
    length, kind = struct.unpack(">IB", frame[:5])
    assert kind == FrameKind.MESSAGE
    assert length == len(frame) - 4
    assert json.loads(frame[5:]) == {"type": "ping", "id": 7}
