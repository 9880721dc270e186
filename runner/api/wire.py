"""The client side of HTTP/1.1 and WebSocket (RFC 6455), without I/O.

Just enough for the daemon's local API, so the CLI's per-job commands (the
GitLab executor's stages, ``submit``) talk to it with the standard library
alone: aiohttp costs them more start-up time than the whole stage is allowed.
Bytes in, values out; `runner.api.local` does the socket I/O around it.

Strict on purpose: a response or frame that does not parse raises `WireError`
naming what is wrong; nothing is guessed.
"""

from __future__ import annotations

import base64
import os
import struct
from typing import NamedTuple

MAX_HEAD = 64 * 1024
"""Largest response status line plus headers accepted."""
MAX_BODY = 64 * 2**20
"""Largest JSON response body or WebSocket message accepted."""
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
_CONTINUATION = 0x0


class WireError(ValueError):
    """The peer sent bytes that are not the HTTP or WebSocket it should have."""


def request(method: str, target: str, *, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> bytes:
    """An HTTP/1.1 request; ``target`` must already be percent-encoded."""
    if not target.startswith("/") or any(c in target for c in " \r\n"):
        raise WireError(f"bad request target {target[:40]!r}")
    lines = [f"{method} {target} HTTP/1.1", "Host: snapfleet"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    head = "\r\n".join(lines) + "\r\n\r\n"
    if "\x00" in head or not head.isascii():
        raise WireError("request head must be ASCII without NUL")
    return head.encode() + (body or b"")


class Head(NamedTuple):
    """A response's status and headers (names lower-cased)."""

    status: int
    headers: dict[str, str]

    def body_framing(self) -> int | None:
        """The body's length; None when it is chunked. WireError when it says neither."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            return None
        length = self.headers.get("content-length")
        if length is None:
            if self.status in (101, 204, 304) or 100 <= self.status < 200:
                return 0
            raise WireError(f"HTTP {self.status} response has neither a length nor chunks")
        if not length.isdigit() or int(length) > MAX_BODY:
            raise WireError(f"bad Content-Length {length[:20]!r}")
        return int(length)


def split_head(buffer: bytes) -> tuple[Head, bytes] | None:
    """(head, the bytes after it) once ``buffer`` holds a whole head, else None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise WireError(f"response head longer than {MAX_HEAD} bytes")
        return None
    try:
        status_line, *lines = buffer[:end].decode("latin-1").split("\r\n")
        version, code, _reason = (status_line + " ").split(" ", 2)
        if version not in ("HTTP/1.1", "HTTP/1.0") or not (code.isdigit() and len(code) == 3):
            raise ValueError(status_line[:40])
        headers: dict[str, str] = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise ValueError(line[:40])
            headers[name.lower()] = value.strip()
    except ValueError as exc:
        raise WireError(f"malformed HTTP response head: {exc}") from None
    return Head(int(code), headers), buffer[end + 4:]


class Chunks:
    """Decodes a chunked body: ``feed`` bytes, get the data so far; ``done`` at the end."""

    def __init__(self) -> None:
        self._buffer = b""
        self._left = 0  # data bytes left in the current chunk, then its CRLF
        self._in_data = False
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = bytearray()
        while not self.done:
            if self._in_data:
                take = min(self._left, len(self._buffer))
                out += self._buffer[:take]
                self._buffer = self._buffer[take:]
                self._left -= take
                if self._left or len(self._buffer) < 2:
                    break
                if self._buffer[:2] != b"\r\n":
                    raise WireError("chunk not followed by CRLF")
                self._buffer = self._buffer[2:]
                self._in_data = False
                continue
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > 1024:
                    raise WireError("chunk size line too long")
                break
            size_text = self._buffer[:end].split(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise WireError(f"bad chunk size {size_text[:20]!r}") from None
            if size < 0:
                raise WireError("negative chunk size")
            self._buffer = self._buffer[end + 2:]
            if size == 0:
                # Trailers are not used by the daemon; the terminating CRLF may
                # still be in flight, and nothing after it matters.
                self.done = True
                break
            self._left, self._in_data = size, True
        return bytes(out)


def ws_key() -> str:
    """A fresh Sec-WebSocket-Key."""
    return base64.b64encode(os.urandom(16)).decode()


def ws_upgrade(target: str, key: str) -> bytes:
    """The opening handshake for ``target``."""
    return request("GET", target, headers={
        "Upgrade": "websocket", "Connection": "Upgrade",
        "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13",
    })


def check_upgrade(head: Head, key: str) -> None:
    """WireError unless ``head`` accepts the upgrade asked for with ``key``."""
    import hashlib  # here: only `run` stages need it (~3 ms of OpenSSL)

    # RFC 6455 fixes SHA-1 here; it proves a WebSocket server answered, nothing more.
    digest = hashlib.sha1(key.encode() + _WS_GUID, usedforsecurity=False).digest()
    accept = base64.b64encode(digest).decode()
    if head.headers.get("upgrade", "").lower() != "websocket":
        raise WireError("the 101 response does not upgrade to websocket")
    if head.headers.get("sec-websocket-accept") != accept:
        raise WireError("the 101 response has a wrong Sec-WebSocket-Accept")
    if head.headers.get("sec-websocket-extensions"):
        raise WireError("the server chose an extension nobody asked for")


def frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final client frame: masked, as RFC 6455 requires of clients."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + mask + _apply_mask(payload, mask)


def _apply_mask(data: bytes, mask: bytes) -> bytes:
    if not data:
        return b""
    key = int.from_bytes((mask * (len(data) // 4 + 1))[: len(data)], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(len(data), "big")


class Message(NamedTuple):
    opcode: int  # TEXT, BINARY, CLOSE, PING or PONG
    data: bytes


class Frames:
    """Decodes server frames into whole messages (fragments joined)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._parts: list[bytes] = []
        self._opcode: int | None = None  # of a fragmented message in progress

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        out: list[Message] = []
        while (parsed := self._next()) is not None:
            fin, opcode, payload = parsed
            if opcode >= CLOSE:
                if not fin or len(payload) > 125:
                    raise WireError("control frame fragmented or longer than 125 bytes")
                out.append(Message(opcode, payload))
                continue
            if (opcode == _CONTINUATION) != (self._opcode is not None):
                raise WireError("continuation frame out of place")
            if opcode != _CONTINUATION:
                self._opcode = opcode
            self._parts.append(payload)
            if sum(map(len, self._parts)) > MAX_BODY:
                raise WireError(f"message longer than {MAX_BODY} bytes")
            if fin:
                assert self._opcode is not None
                out.append(Message(self._opcode, b"".join(self._parts)))
                self._parts, self._opcode = [], None
        return out

    def _next(self) -> tuple[bool, int, bytes] | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        if first & 0x70:
            raise WireError("frame has reserved bits set")
        if second & 0x80:
            raise WireError("server frames must not be masked")
        opcode, length, at = first & 0x0F, second & 0x7F, 2
        if opcode not in (_CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG):
            raise WireError(f"unknown opcode {opcode}")
        if length >= 126:
            size = 2 if length == 126 else 8
            if len(buf) < 2 + size:
                return None
            length = int.from_bytes(buf[2:2 + size], "big")
            at += size
        if length > MAX_BODY:
            raise WireError(f"frame longer than {MAX_BODY} bytes")
        if len(buf) < at + length:
            return None
        self._buffer = buf[at + length:]
        return bool(first & 0x80), opcode, buf[at:at + length]
