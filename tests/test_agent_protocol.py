"""The agent wire protocol with two in-memory ends: no sockets, no processes."""

from __future__ import annotations

import dataclasses
import json
import random
import struct
from typing import Any

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

REQUESTS: list[proto.Message] = [
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
    proto.Exec(4_294_967_295, argv=["true"]),
]
"""Host messages, all outstanding at once: every reply below answers one of them."""
REPLIES: list[proto.Event] = [
    proto.Hello(0, proto.PROTOCOL_VERSION, "0b6f4c1e-boot"),
    proto.Pong(1),
    proto.Ok(2),
    proto.Error(3, "no such thing"),
    proto.Output(4, proto.STDOUT, b"line\n"),
    proto.Output(4, proto.STDERR, b"\xff\xfe not utf-8 \x00\x80"),
    proto.Exited(4, exit_code=3, signal=None, timed_out=False, cancelled=False),
    proto.Output(5, proto.STDOUT, b""),
    proto.Ok(7),
    proto.Exited(5, exit_code=None, signal=9, timed_out=True, cancelled=True),
    proto.Ok(6),
    proto.Output(4_294_967_295, proto.STDOUT, b"x"),
    proto.Error(4_294_967_295, "agent failed running the exec"),
    proto.Ok(8),
    proto.Error(0, "message is not a JSON object"),
]


def message_frame(obj: object, *, kind: int = FrameKind.MESSAGE) -> bytes:
    """A frame holding exactly this JSON (valid or not), bypassing the encoder."""
    payload = json.dumps(obj).encode()
    return struct.pack(">IB", len(payload) + 1, kind) + payload


def raw_frame(payload: bytes, kind: int = FrameKind.MESSAGE) -> bytes:
    return struct.pack(">IB", len(payload) + 1, kind) + payload


def feed(conn: Connection, data: bytes) -> list[proto.Event]:
    """Give ``conn`` the bytes and return every event they complete (raising at the first
    invalid one: the events after it stay buffered for the next call)."""
    conn.receive_data(data)
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    return events


def raw(event: proto.Event) -> bytes:
    """``event``'s frame, whatever the conversation says (what a misbehaving peer sends)."""
    if isinstance(event, proto.Output):
        return proto.encode_output(event.exec_id, event.stream, event.data)
    return raw_frame(messages._encode_message(event))


@pytest.fixture
def host() -> Connection:
    return Connection(Role.HOST)


@pytest.fixture
def guest() -> Connection:
    return Connection(Role.GUEST)


def send_requests(host: Connection, guest: Connection, requests: list[proto.Message]) -> None:
    for request in requests:
        assert feed(guest, host.send(request)) == [request]


@pytest.mark.parametrize("message", REQUESTS, ids=lambda m: type(m).__name__)
def test_host_messages_round_trip(
    host: Connection, guest: Connection, message: proto.Message
) -> None:
    send_requests(host, guest, REQUESTS[:6])  # the cancel names exec 5
    if message not in REQUESTS[:6]:
        assert feed(guest, host.send(message)) == [message]
    assert guest.buffered == 0
    assert host.outstanding == guest.outstanding


def test_guest_messages_round_trip_in_a_conversation(host: Connection, guest: Connection) -> None:
    send_requests(host, guest, REQUESTS)
    for reply in REPLIES:
        assert feed(host, guest.send(reply)) == [reply]
        assert host.outstanding == guest.outstanding
    assert host.outstanding == {} == guest.outstanding


def test_every_message_type_is_covered() -> None:
    sent = {type(m) for m in [*REQUESTS, *REPLIES]}
    assert sent == {*messages._MESSAGE_TYPES.values(), proto.Output}


def test_partial_frames_byte_by_byte(host: Connection, guest: Connection) -> None:
    send_requests(host, guest, REQUESTS)
    stream = b"".join(guest.send(m) for m in REPLIES)
    events: list[proto.Event] = []
    for i in range(len(stream)):
        events += feed(host, stream[i : i + 1])
    assert events == REPLIES
    assert host.buffered == 0
    assert host.outstanding == {}


def test_many_frames_in_one_chunk(host: Connection, guest: Connection) -> None:
    stream = b"".join(host.send(m) for m in REQUESTS)
    assert feed(guest, stream[:-3]) == REQUESTS[:-1]
    assert feed(guest, stream[-3:]) == REQUESTS[-1:]


def test_output_bytes_exact(host: Connection, guest: Connection) -> None:
    send_requests(host, guest, [proto.Exec(42, argv=["cat"])])
    data = bytes(range(256)) * 10
    frame = guest.send(proto.Output(42, proto.STDERR, data))
    assert data in frame  # raw, not base64
    (event,) = feed(host, frame)
    assert event == proto.Output(42, proto.STDERR, data)


def test_largest_output_fits(host: Connection, guest: Connection) -> None:
    send_requests(host, guest, [proto.Exec(1, argv=["cat"])])
    data = b"x" * MAX_OUTPUT_DATA
    (event,) = feed(host, guest.send(proto.Output(1, proto.STDOUT, data)))
    assert isinstance(event, proto.Output)
    assert event.data == data
    with pytest.raises(AgentProtocolError, match="exceeds"):
        guest.send(proto.Output(1, proto.STDOUT, data + b"x"))


def test_oversize_frame_breaks_the_connection(guest: Connection) -> None:
    header = struct.pack(">IB", MAX_FRAME_SIZE + 1, FrameKind.MESSAGE)
    with pytest.raises(AgentProtocolError, match="frame length"):
        feed(guest, header)
    assert guest.broken
    with pytest.raises(AgentProtocolError, match="frame length"):
        guest.next_event()
    with pytest.raises(AgentProtocolError, match="frame length"):
        guest.receive_data(b"")


def test_unknown_frame_kind(guest: Connection) -> None:
    with pytest.raises(AgentProtocolError, match="frame kind 7"):
        feed(guest, raw_frame(b"{}", kind=7))


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
        feed(guest, raw_frame(payload))


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
        feed(guest, message_frame(obj))
    assert not guest.broken
    if isinstance(obj, dict) and type(obj.get("id")) is int and obj["id"] >= 0:
        assert info.value.message_id == obj["id"]


def test_errors_never_echo_values(guest: Connection) -> None:
    secret = "hunter2-very-secret"
    bad = {"type": "configure", "id": 1, "clock_ns": 1, "entropy": "", "env": {"K": [secret]}}
    with pytest.raises(AgentProtocolError) as info:
        feed(guest, message_frame(bad))
    assert secret not in str(info.value)


def test_stream_continues_after_an_invalid_message(host: Connection, guest: Connection) -> None:
    stream = host.send(proto.Ping(1)) + message_frame({"type": "nope", "id": 2})
    stream += host.send(proto.Ping(3))
    guest.receive_data(stream)
    assert guest.next_event() == proto.Ping(1)
    with pytest.raises(AgentProtocolError, match="nope"):
        guest.next_event()
    assert guest.next_event() == proto.Ping(3)
    assert guest.next_event() is None


def test_host_rejects_output_from_itself_and_guest_rejects_output(host: Connection) -> None:
    with pytest.raises(AgentProtocolError, match="guest only"):
        host.send(proto.Output(1, proto.STDOUT, b""))
    guest = Connection(Role.GUEST)
    with pytest.raises(AgentProtocolError, match="guest only"):
        feed(guest, raw_frame(struct.pack(">IB", 1, 1), kind=FrameKind.OUTPUT))


def test_bad_output_frames(host: Connection) -> None:
    with pytest.raises(AgentProtocolError, match="shorter than its header"):
        feed(host, raw_frame(b"\x00\x00", kind=FrameKind.OUTPUT))
    with pytest.raises(AgentProtocolError, match="unknown stream 3"):
        feed(host, raw_frame(struct.pack(">IB", 1, 3) + b"x", kind=FrameKind.OUTPUT))


def test_send_checks_direction_and_fields(host: Connection, guest: Connection) -> None:
    with pytest.raises(AgentProtocolError, match="'pong' is not sent by the host"):
        host.send(proto.Pong(1))
    with pytest.raises(AgentProtocolError, match="id: must be within"):
        guest.send(proto.Ok(2**32))
    assert host.outstanding == {} == guest.outstanding


def test_frame_layout(host: Connection) -> None:
    frame = host.send(proto.Ping(7))
    length, kind = struct.unpack(">IB", frame[:5])
    assert kind == FrameKind.MESSAGE
    assert length == len(frame) - 4
    assert json.loads(frame[5:]) == {"type": "ping", "id": 7}


def test_exec_wire_format_is_flat_with_type_and_id_first(host: Connection) -> None:
    frame = host.send(proto.Exec(9, argv=["a"], env={"K": "v"}, timeout=1.5, stdin=b"\x00"))
    obj = json.loads(frame[5:])
    assert list(obj) == ["type", "id", "argv", "script", "shell", "env", "cwd", "timeout", "stdin"]
    assert obj == {"type": "exec", "id": 9, "argv": ["a"], "script": None, "shell": "/bin/sh",
                   "env": {"K": "v"}, "cwd": None, "timeout": 1.5, "stdin": "AA=="}


# --- the one exec value ----------------------------------------------------


def test_an_exec_message_is_a_command_with_an_id() -> None:
    command = proto.Command(script="echo hi", env={"A": "1"}, cwd="/w", timeout=3, stdin=b"in")
    message = proto.Exec.of(12, command)
    assert isinstance(message, proto.Command)
    assert message.id == 12
    for f in dataclasses.fields(proto.Command):
        assert getattr(message, f.name) == getattr(command, f.name)


def test_a_command_keeps_what_it_was_given_as_values() -> None:
    argv, env = ["a", "b"], {"K": "v"}
    command = proto.Command(argv=argv, env=env)
    argv.append("c")
    env["K"] = "changed"
    assert command.argv == ("a", "b")
    assert command.env == {"K": "v"}
    assert proto.Command(argv=("x",)) == proto.Command(argv=["x"])


def test_messages_never_show_secrets_in_their_repr() -> None:
    command = proto.Command(argv=["true"], env={"TOKEN": "hunter2"}, stdin=b"hunter3")
    configure = proto.Configure(1, clock_ns=0, entropy=b"hunter4", env={"TOKEN": "hunter2"})
    put = proto.PutFile(2, "/etc/jit", b"hunter5")
    shown = repr([command, proto.Exec.of(3, command), configure, put])
    for secret in ("hunter2", "hunter3", "hunter4", "hunter5"):
        assert secret not in shown
    assert "/etc/jit" in shown


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "argv: exactly one of argv and script"),
        ({"argv": ["a"], "script": "b"}, "argv: exactly one of argv and script"),
        ({"argv": []}, "argv: must not be empty"),
        ({"argv": "ls -l"}, "argv: must be a list of strings, not one string"),
        ({"argv": ["ls", 1]}, "argv: must hold strings only"),
        ({"script": "x", "env": {"K": 1}}, "env: names and values must be strings"),
        ({"script": "x", "shell": ""}, "shell: must not be empty"),
        ({"script": "x", "timeout": 0}, "timeout: must be positive"),
        ({"script": "x", "timeout": -1.5}, "timeout: must be positive"),
    ],
)
def test_a_bad_command_is_refused_where_it_is_made(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        proto.Command(**kwargs)


# --- the conversation: every transition ------------------------------------

RID = 5
SAMPLES: list[proto.Event] = [
    proto.Ping(RID),
    proto.Configure(RID, clock_ns=1, entropy=b""),
    proto.Exec(RID, argv=["true"]),
    proto.PutFile(RID, "/x", b""),
    proto.Cancel(RID, exec_id=99),
    proto.Shutdown(RID),
    proto.Pong(RID),
    proto.Ok(RID),
    proto.Output(RID, proto.STDOUT, b"x"),
    proto.Exited(RID, exit_code=0, signal=None, timed_out=False, cancelled=False),
    proto.Error(RID, "failed"),
]
S = proto.RequestState
STARTS: dict[S, proto.Message | None] = {
    S.IDLE: None,
    S.AWAITING_PONG: proto.Ping(RID),
    S.AWAITING_OK: proto.Configure(RID, clock_ns=1, entropy=b""),
    S.RUNNING: proto.Exec(RID, argv=["sleep", "9"]),
}


def pair_in(state: S) -> tuple[Connection, Connection]:
    """A host and a guest that agree request ``RID`` is in ``state``."""
    host, guest = Connection(Role.HOST), Connection(Role.GUEST)
    start = STARTS[state]
    if start is not None:
        send_requests(host, guest, [start])
    assert host.state(RID) is state is guest.state(RID)
    return host, guest


def name(event: proto.Event) -> str:
    return "output" if isinstance(event, proto.Output) else event.TYPE


def test_the_table_says_which_replies_each_request_takes() -> None:
    """The protocol as a reader would state it; the table must say exactly this."""
    replies = {
        proto.Ping: {proto.Pong, proto.Error},
        proto.Configure: {proto.Ok, proto.Error},
        proto.PutFile: {proto.Ok, proto.Error},
        proto.Cancel: {proto.Ok, proto.Error},
        proto.Shutdown: {proto.Ok, proto.Error},
        proto.Exec: {proto.Output, proto.Exited, proto.Error},
    }
    for request, answers in replies.items():
        started = proto.TRANSITIONS[(S.IDLE, request)]
        allowed = {event for (state, event) in proto.TRANSITIONS if state is started}
        assert allowed == answers, request
        ends = {e for e in answers if proto.TRANSITIONS[(started, e)] is S.DONE}
        assert ends == answers - {proto.Output}, request
    assert {e for (state, e) in proto.TRANSITIONS if state is S.REJECTED} == {proto.Error}
    assert {e for (state, e) in proto.TRANSITIONS if state is S.IDLE} == set(replies)


@pytest.mark.parametrize("state", list(STARTS), ids=lambda s: s.name)
@pytest.mark.parametrize("event", SAMPLES, ids=name)
def test_sending_follows_the_table(state: S, event: proto.Event) -> None:
    host, guest = pair_in(state)
    sender = host if isinstance(event, proto.Message) and event.SENDER is Role.HOST else guest
    expected = proto.TRANSITIONS.get((state, type(event)))
    if expected is None:
        with pytest.raises(AgentProtocolError) as info:
            sender.send(event)
        assert info.value.message_id == RID
        assert sender.state(RID) is state  # a refused send changes nothing
    else:
        sender.send(event)
        assert sender.state(RID) is (S.IDLE if expected is S.DONE else expected)


@pytest.mark.parametrize("state", list(STARTS), ids=lambda s: s.name)
@pytest.mark.parametrize("event", SAMPLES, ids=name)
def test_receiving_follows_the_table(state: S, event: proto.Event) -> None:
    host, guest = pair_in(state)
    receiver = guest if isinstance(event, proto.Message) and event.SENDER is Role.HOST else host
    expected = proto.TRANSITIONS.get((state, type(event)))
    if expected is None:
        with pytest.raises(AgentProtocolError) as info:
            feed(receiver, raw(event))
        assert info.value.message_id == RID
        # The request it named has failed: the host expects nothing more for it;
        # the guest owes it exactly one Error.
        after = S.REJECTED if receiver is guest else S.IDLE
        assert receiver.state(RID) is after
        assert not receiver.broken
    else:
        assert feed(receiver, raw(event)) == [event]
        assert receiver.state(RID) is (S.IDLE if expected is S.DONE else expected)


def test_a_rejected_request_is_ended_by_its_error_and_nothing_else(guest: Connection) -> None:
    with pytest.raises(AgentProtocolError, match="unknown field"):
        feed(guest, message_frame({"type": "ping", "id": 4, "x": 1}))
    assert guest.state(4) is S.REJECTED
    for wrong in (proto.Pong(4), proto.Ok(4), proto.Output(4, proto.STDOUT, b"")):
        with pytest.raises(AgentProtocolError, match="rejected"):
            guest.send(wrong)
    guest.send(proto.Error(4, "ping: unknown field(s) x"))
    assert guest.outstanding == {}


# --- unexpected replies, by name --------------------------------------------


def test_a_reply_to_nothing_is_an_error_naming_its_id(host: Connection) -> None:
    with pytest.raises(AgentProtocolError, match=r"^pong for request 9, which is not outstanding$"):
        feed(host, raw(proto.Pong(9)))
    with pytest.raises(AgentProtocolError, match=r"^error for request 9, which") as info:
        feed(host, raw(proto.Error(9, "what request?")))
    assert info.value.message_id == 9


def test_a_reply_of_the_wrong_kind_fails_its_request(host: Connection, guest: Connection) -> None:
    send_requests(host, guest, [proto.Ping(1), proto.Exec(2, argv=["true"])])
    with pytest.raises(AgentProtocolError, match=r"^ok for request 1 \(ping, awaiting pong\)$"):
        feed(host, raw(proto.Ok(1)))
    with pytest.raises(AgentProtocolError, match=r"^pong for request 2 \(exec, running\)$"):
        feed(host, raw(proto.Pong(2)))
    assert host.outstanding == {}  # both failed: nothing more is expected for them
    with pytest.raises(AgentProtocolError, match="not outstanding"):
        feed(host, guest.send(proto.Pong(1)))  # the right reply, too late


def test_output_for_an_exec_that_is_not_running(host: Connection, guest: Connection) -> None:
    with pytest.raises(AgentProtocolError, match=r"^output for request 3, which is not"):
        feed(host, raw(proto.Output(3, proto.STDOUT, b"stray")))
    send_requests(host, guest, [proto.Exec(3, argv=["true"])])
    exited = proto.Exited(3, exit_code=0, signal=None, timed_out=False, cancelled=False)
    feed(host, guest.send(exited))
    with pytest.raises(AgentProtocolError, match=r"^output for request 3, which is not"):
        feed(host, raw(proto.Output(3, proto.STDOUT, b"after the end")))
    with pytest.raises(AgentProtocolError, match=r"^exited for request 3, which is not"):
        feed(host, raw(exited))  # exited twice
    with pytest.raises(AgentProtocolError, match="not outstanding"):
        guest.send(proto.Output(3, proto.STDOUT, b"the guest cannot either"))


def test_invalid_reply_fields_fail_the_request_they_name(
    host: Connection, guest: Connection
) -> None:
    send_requests(host, guest, [proto.Exec(6, argv=["true"]), proto.Ping(7)])
    with pytest.raises(AgentProtocolError, match="unknown stream 9") as info:
        feed(host, raw_frame(struct.pack(">IB", 6, 9) + b"x", kind=FrameKind.OUTPUT))
    assert info.value.message_id == 6
    with pytest.raises(AgentProtocolError, match=r"exited\.timed_out: missing"):
        feed(host, message_frame({"type": "exited", "id": 7, "exit_code": 0,
                                         "signal": None, "cancelled": False}))
    assert host.outstanding == {}


def test_events_and_violations_come_in_stream_order(host: Connection, guest: Connection) -> None:
    """A reply before a violation is handed over before it: the violation about a
    second ``exited`` must not fail the exec the first one ended."""
    send_requests(host, guest, [proto.Ping(1), proto.Exec(2, argv=["true"])])
    done = proto.Exited(2, exit_code=0, signal=None, timed_out=False, cancelled=False)
    host.receive_data(guest.send(proto.Pong(1)) + guest.send(done) + raw(done) + raw(proto.Pong(1)))
    assert host.next_event() == proto.Pong(1)
    assert host.next_event() == done
    with pytest.raises(AgentProtocolError, match="exited for request 2, which is not"):
        host.next_event()
    with pytest.raises(AgentProtocolError, match="pong for request 1, which is not"):
        host.next_event()
    assert host.next_event() is None
    assert host.outstanding == {}


def test_hello_and_error_zero_belong_to_the_connection(
    host: Connection, guest: Connection
) -> None:
    send_requests(host, guest, [proto.Ping(1)])
    hello = proto.Hello(0, proto.PROTOCOL_VERSION, "boot")
    complaint = proto.Error(0, "message is not a JSON object")
    assert feed(host, guest.send(hello) + guest.send(complaint) + guest.send(hello)) == [
        hello, complaint, hello
    ]
    assert host.outstanding == {1: S.AWAITING_PONG}  # neither touches a request
    with pytest.raises(AgentProtocolError, match=r"hello\.id: must be 0"):
        feed(host, raw(proto.Hello(1, proto.PROTOCOL_VERSION, "boot")))
    assert host.outstanding == {}


def test_request_ids_are_unique_while_outstanding(host: Connection, guest: Connection) -> None:
    send_requests(host, guest, [proto.Exec(3, argv=["sleep", "9"])])
    with pytest.raises(AgentProtocolError, match=r"^ping reuses id 3 of an outstanding exec$"):
        host.send(proto.Ping(3))
    assert host.state(3) is S.RUNNING  # refused, nothing changed
    with pytest.raises(AgentProtocolError, match="reuses id 3") as info:
        feed(guest, raw(proto.Exec(3, argv=["true"])))
    assert info.value.message_id == 3
    assert guest.state(3) is S.REJECTED  # its Error ends both: the id is void
    feed(host, guest.send(proto.Error(3, "reused")))
    assert host.outstanding == {} == guest.outstanding
    send_requests(host, guest, [proto.Ping(3)])  # an id is free again once it ended


def test_id_zero_is_never_a_request(host: Connection, guest: Connection) -> None:
    with pytest.raises(AgentProtocolError, match=r"ping\.id: 0 is reserved"):
        host.send(proto.Ping(0))
    with pytest.raises(AgentProtocolError, match="0 is reserved") as info:
        feed(guest, raw(proto.Ping(0)))
    assert info.value.message_id == 0
    assert guest.outstanding == {}
    with pytest.raises(AgentProtocolError, match="reserved"):
        guest.send(proto.Pong(0))


def test_cancel_names_an_exec_running_or_ended(host: Connection, guest: Connection) -> None:
    send_requests(host, guest, [proto.Exec(1, argv=["true"]), proto.Ping(2)])
    send_requests(host, guest, [proto.Cancel(3, exec_id=1)])  # running
    send_requests(host, guest, [proto.Cancel(4, exec_id=77)])  # ended (exited in flight)
    refusal = r"cancel\.exec_id: request 2 is not a running exec \(ping, awaiting pong\)"
    with pytest.raises(AgentProtocolError, match=refusal):
        host.send(proto.Cancel(5, exec_id=2))
    with pytest.raises(AgentProtocolError, match="request 2 is not a running exec") as info:
        feed(guest, raw(proto.Cancel(5, exec_id=2)))
    assert info.value.message_id == 5
    assert guest.state(2) is S.AWAITING_PONG


def test_both_ends_agree_with_many_execs_interleaved(host: Connection, guest: Connection) -> None:
    send_requests(host, guest, [proto.Exec(i, argv=["true"]) for i in range(1, 6)])
    stream = b""
    for round_ in range(3):
        for i in range(1, 6):
            stream += guest.send(proto.Output(i, 1 + (i + round_) % 2, b"%d" % i))
    stream += guest.send(proto.Exited(3, exit_code=0, signal=None, timed_out=False,
                                      cancelled=False))
    stream += guest.send(proto.Error(5, "pump failed"))
    events = feed(host, stream)
    assert len(events) == 17
    assert host.outstanding == guest.outstanding == {1: S.RUNNING, 2: S.RUNNING, 4: S.RUNNING}


# --- fuzz-ish: random conversations against an independent model ------------

REPLY_KINDS: dict[type[proto.Message], set[type[proto.Event]]] = {
    proto.Ping: {proto.Pong, proto.Error},
    proto.Configure: {proto.Ok, proto.Error},
    proto.PutFile: {proto.Ok, proto.Error},
    proto.Cancel: {proto.Ok, proto.Error},
    proto.Shutdown: {proto.Ok, proto.Error},
    proto.Exec: {proto.Output, proto.Exited, proto.Error},
}
MODEL_STATE = {proto.Ping: S.AWAITING_PONG, proto.Exec: S.RUNNING}


class Model:
    """The rules written out plainly, apart from `TRANSITIONS`: id → the request's type."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.open: dict[int, type[proto.Message] | None] = {}  # None: rejected by the guest

    def allows(self, event: proto.Event) -> bool:
        rid = event.exec_id if isinstance(event, proto.Output) else event.id
        if isinstance(event, proto.Hello):
            return rid == 0
        if isinstance(event, proto.Error) and rid == 0:
            return True
        if rid == 0:
            return False
        if type(event) in REPLY_KINDS:  # a request
            if isinstance(event, proto.Cancel) and self.open.get(event.exec_id, proto.Exec) is not (
                proto.Exec
            ):
                return False  # it names an outstanding request that is not a running exec
            return rid not in self.open
        if rid not in self.open:
            return False
        request = self.open[rid]
        if request is None:
            return isinstance(event, proto.Error)
        return type(event) in REPLY_KINDS[request]

    def apply(self, event: proto.Event) -> None:
        rid = event.exec_id if isinstance(event, proto.Output) else event.id
        if isinstance(event, proto.Hello) or rid == 0 or isinstance(event, proto.Output):
            return
        if type(event) in REPLY_KINDS:
            self.open[rid] = type(event)
        else:
            del self.open[rid]

    def refuse_received(self, rid: int | None) -> None:
        if rid is None or rid == 0:
            return
        if self.role is Role.HOST:
            self.open.pop(rid, None)
        else:
            self.open[rid] = None

    def states(self) -> dict[int, S]:
        return {
            rid: S.REJECTED if kind is None else MODEL_STATE.get(kind, S.AWAITING_OK)
            for rid, kind in self.open.items()
        }


def random_event(rng: random.Random, *, requests: bool) -> proto.Event:
    rid = rng.choice([0, 1, 2, 3, 3, 4])  # few ids: reuse and collisions are common
    options: list[proto.Event]
    if requests:
        options = [
            proto.Ping(rid),
            proto.Configure(rid, clock_ns=1, entropy=b"e"),
            proto.Exec(rid, argv=["true"]),
            proto.PutFile(rid, "/f", b"d"),
            proto.Cancel(rid, exec_id=rng.choice([1, 2, 3, 4])),
            proto.Shutdown(rid),
        ]
    else:
        options = [
            proto.Hello(rng.choice([0, 0, 0, rid]), proto.PROTOCOL_VERSION, "b"),
            proto.Pong(rid),
            proto.Ok(rid),
            proto.Output(rid, rng.choice([1, 2]), b"o"),
            proto.Output(rid, proto.STDOUT, b"o"),
            proto.Exited(rid, exit_code=0, signal=None, timed_out=False, cancelled=False),
            proto.Error(rid, "e"),
        ]
    return rng.choice(options)


@pytest.mark.parametrize("role", [Role.HOST, Role.GUEST], ids=lambda r: r.value)
@pytest.mark.parametrize("seed", range(40))
def test_random_conversations_match_the_model(role: Role, seed: int) -> None:
    """Each end sends its own messages and receives the peer's, any order, any ids."""
    rng = random.Random(seed)
    conn, model = Connection(role), Model(role)
    for _ in range(300):
        sending = rng.random() < 0.5
        event = random_event(rng, requests=sending == (role is Role.HOST))
        allowed = model.allows(event)
        if sending:
            if allowed:
                conn.send(event)
                model.apply(event)
            else:
                with pytest.raises(AgentProtocolError):
                    conn.send(event)
        else:
            try:
                assert feed(conn, raw(event)) == [event]
            except AgentProtocolError as exc:
                assert not allowed, (event, model.open)
                model.refuse_received(exc.message_id)
            else:
                assert allowed, (event, model.open)
                model.apply(event)
        assert conn.outstanding == model.states(), event


@pytest.mark.parametrize("seed", range(40))
def test_mangled_streams_raise_only_protocol_errors(seed: int) -> None:
    """Flipped bytes, cut frames, random chunking: only AgentProtocolError, never a
    crash, and what gets through still follows the rules."""
    rng = random.Random(seed)
    host, guest = Connection(Role.HOST), Connection(Role.GUEST)
    send_requests(host, guest, REQUESTS)
    model = Model(Role.HOST)
    for request in REQUESTS:
        model.apply(request)
    stream = bytearray(b"".join(guest.send(m) for m in REPLIES))
    for _ in range(rng.randint(1, 8)):
        stream[rng.randrange(len(stream))] = rng.randrange(256)
    if rng.random() < 0.3:
        del stream[rng.randrange(len(stream)) :]
    position = 0
    while position < len(stream):
        chunk = bytes(stream[position : position + rng.randint(1, 300)])
        position += len(chunk)
        host.receive_data(chunk)
        while True:
            try:
                event = host.next_event()
            except AgentProtocolError as exc:
                if host.broken:
                    with pytest.raises(AgentProtocolError):
                        host.receive_data(b"")
                    return
                model.refuse_received(exc.message_id)
                continue
            if event is None:
                break
            assert model.allows(event), event
            model.apply(event)
        assert host.outstanding == model.states()


@pytest.mark.parametrize("seed", range(20))
def test_two_ends_stay_in_step_over_a_chunked_stream(seed: int) -> None:
    """A valid random conversation, delivered in random chunks: both ends agree throughout."""
    rng = random.Random(seed)
    host, guest = Connection(Role.HOST), Connection(Role.GUEST)
    next_id = 1
    to_guest, to_host = bytearray(), bytearray()
    for _ in range(200):
        move = rng.random()
        if move < 0.3:
            kind = rng.choice([proto.Ping, proto.Exec, proto.Configure])
            request: proto.Message = (
                proto.Ping(next_id) if kind is proto.Ping
                else proto.Exec(next_id, argv=["x"]) if kind is proto.Exec
                else proto.Configure(next_id, clock_ns=0, entropy=b"")
            )
            next_id += 1
            to_guest += host.send(request)
        elif move < 0.6 and to_guest:
            cut = rng.randint(1, len(to_guest))
            feed(guest, bytes(to_guest[:cut]))
            del to_guest[:cut]
        elif move < 0.85 and guest.outstanding:
            rid, state = rng.choice(sorted(guest.outstanding.items()))
            replies: dict[S, proto.Event] = {
                S.AWAITING_PONG: proto.Pong(rid),
                S.AWAITING_OK: proto.Ok(rid),
                S.RUNNING: proto.Output(rid, proto.STDOUT, b"o") if rng.random() < 0.7
                else proto.Exited(rid, exit_code=0, signal=None, timed_out=False, cancelled=False),
            }
            to_host += guest.send(replies[state])
        elif to_host:
            cut = rng.randint(1, len(to_host))
            feed(host, bytes(to_host[:cut]))
            del to_host[:cut]
    feed(guest, bytes(to_guest))
    feed(host, bytes(to_host))
    assert host.outstanding == guest.outstanding
