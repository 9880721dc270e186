"""`runner.api.wire`: the client side of HTTP/1.1 and RFC 6455, bytes in, values out.

Vectors are RFC 6455's own examples (section 5.7 and 1.3); every decoder is also
fed its input split at every byte, as a socket may deliver it.
"""

from __future__ import annotations

import pytest

from runner.api import wire


def feed_split(decoder: wire.Frames, data: bytes) -> list[wire.Message]:
    """All messages from ``data`` delivered one byte at a time."""
    out: list[wire.Message] = []
    for i in range(len(data)):
        out += decoder.feed(data[i:i + 1])
    return out


def test_masked_client_frame_is_rfc_6455s_example() -> None:
    assert wire.frame(wire.TEXT, b"Hello", mask=bytes.fromhex("37fa213d")) == bytes.fromhex(
        "818537fa213d7f9f4d5158"
    )


@pytest.mark.parametrize(("size", "length_bytes"), [(125, 1), (126, 3), (65535, 3), (65536, 9)])
def test_client_frames_use_the_shortest_length_and_mask_every_byte(size: int,
                                                                   length_bytes: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    mask = bytes.fromhex("01020304")
    data = wire.frame(wire.BINARY, payload, mask=mask)
    assert data[0] == 0x82
    assert data[1] & 0x80
    header = 1 + length_bytes
    assert data[header:header + 4] == mask
    body = data[header + 4:]
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(body)) == payload


@pytest.mark.parametrize(("data", "expected"), [
    (bytes.fromhex("810548656c6c6f"), [(wire.TEXT, b"Hello")]),
    # A fragmented text message, with a ping between its fragments.
    (bytes.fromhex("010348656c") + bytes.fromhex("890548656c6c6f") + bytes.fromhex("80026c6f"),
     [(wire.PING, b"Hello"), (wire.TEXT, b"Hello")]),
    (bytes.fromhex("827e0100") + b"x" * 256, [(wire.BINARY, b"x" * 256)]),
    (bytes.fromhex("827f0000000000010000") + b"y" * 65536, [(wire.BINARY, b"y" * 65536)]),
    (bytes.fromhex("88020" + "3e8"), [(wire.CLOSE, b"\x03\xe8")]),
])
def test_server_frames_decode_whole_or_byte_by_byte(data: bytes,
                                                     expected: list[tuple[int, bytes]]) -> None:
    assert wire.Frames().feed(data) == expected
    assert feed_split(wire.Frames(), data) == expected


@pytest.mark.parametrize(("data", "reason"), [
    (bytes.fromhex("818537fa213d7f9f4d5158"), "must not be masked"),
    (bytes.fromhex("c10548656c6c6f"), "reserved bits"),
    (bytes.fromhex("830548656c6c6f"), "unknown opcode 3"),
    (bytes.fromhex("80026c6f"), "continuation frame out of place"),
    (bytes.fromhex("010348656c") + bytes.fromhex("810548656c6c6f"), "out of place"),
    (bytes.fromhex("09026869"), "control frame fragmented"),
    (bytes.fromhex("897e007e") + b"p" * 126, "longer than 125"),
    (bytes.fromhex("827f7fffffffffffffff"), "frame longer than"),
])
def test_bad_server_frames_are_refused_naming_the_fault(data: bytes, reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.Frames().feed(data)


def test_handshake_accept_is_checked() -> None:
    key = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3
    good = wire.Head(101, {"upgrade": "websocket",
                           "sec-websocket-accept": "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="})
    wire.check_upgrade(good, key)
    with pytest.raises(wire.WireError, match="wrong Sec-WebSocket-Accept"):
        wire.check_upgrade(good, wire.ws_key())
    with pytest.raises(wire.WireError, match="does not upgrade"):
        wire.check_upgrade(wire.Head(101, {**good.headers, "upgrade": "h2c"}), key)
    with pytest.raises(wire.WireError, match="extension"):
        wire.check_upgrade(
            wire.Head(101, {**good.headers, "sec-websocket-extensions": "permessage-deflate"}),
            key,
        )


def test_upgrade_request_asks_for_websocket_13() -> None:
    text = wire.ws_upgrade("/v1/leases/k/exec", "a2V5").decode()
    assert text.startswith("GET /v1/leases/k/exec HTTP/1.1\r\n")
    assert "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" in text
    assert "Sec-WebSocket-Key: a2V5\r\nSec-WebSocket-Version: 13\r\n\r\n" in text


def test_request_with_a_body_says_its_length() -> None:
    assert wire.request("POST", "/v1/jobs", body=b'{"a": 1}',
                        headers={"Connection": "close"}) == (
        b"POST /v1/jobs HTTP/1.1\r\nHost: snapfleet\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: 8\r\n\r\n{\"a\": 1}"
    )


@pytest.mark.parametrize("target", ["/v1/jobs/a b", "/v1/jobs/x\r\nEvil: 1", "v1/jobs"])
def test_request_refuses_a_target_that_would_break_the_request_line(target: str) -> None:
    with pytest.raises(wire.WireError, match="bad request target"):
        wire.request("GET", target)


def test_response_head_splits_from_the_body() -> None:
    data = (b"HTTP/1.1 422 Unprocessable Entity\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\n\r\n{}")
    assert wire.split_head(data[:20]) is None
    head, rest = wire.split_head(data) or (None, b"")
    assert head == wire.Head(422, {"content-type": "application/json", "content-length": "2"})
    assert rest == b"{}"
    assert head.body_framing() == 2


@pytest.mark.parametrize(("data", "reason"), [
    (b"SPDY/3 200 OK\r\n\r\n", "malformed"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed"),
    (b"HTTP/1.1 200 OK\r\nno-colon\r\n\r\n", "malformed"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000, "longer than"),
])
def test_bad_response_heads_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.split_head(data)


@pytest.mark.parametrize(("headers", "framing"), [
    ({"transfer-encoding": "chunked"}, None),
    ({"content-length": "0"}, 0),
    ({"content-length": "-1"}, "bad Content-Length"),
    ({"content-length": str(wire.MAX_BODY + 1)}, "bad Content-Length"),
    ({}, "neither a length nor chunks"),
])
def test_body_framing(headers: dict[str, str], framing: int | str | None) -> None:
    head = wire.Head(200, headers)
    if isinstance(framing, str):
        with pytest.raises(wire.WireError, match=framing):
            head.body_framing()
    else:
        assert head.body_framing() == framing


CHUNKED = b"5\r\nhello\r\n1;ext=1\r\n,\r\n6\r\n world\r\n0\r\n\r\n"


def test_chunked_body_decodes_however_it_is_split() -> None:
    whole = wire.Chunks()
    assert whole.feed(CHUNKED) == b"hello, world"
    assert whole.done
    for cut in range(len(CHUNKED) + 1):
        chunks = wire.Chunks()
        assert chunks.feed(CHUNKED[:cut]) + chunks.feed(CHUNKED[cut:]) == b"hello, world"
        assert chunks.done
    bytewise = wire.Chunks()
    assert b"".join(bytewise.feed(CHUNKED[i:i + 1]) for i in range(len(CHUNKED))) == (
        b"hello, world"
    )


@pytest.mark.parametrize(("data", "reason"), [
    (b"zz\r\n", "bad chunk size"),
    (b"-1\r\n", "negative chunk size"),
    (b"2\r\nabX\r\n", "not followed by CRLF"),
    (b"1" * 2000, "size line too long"),
])
def test_bad_chunks_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.Chunks().feed(data)
