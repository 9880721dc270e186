"""A blocking client of the daemon's local API, on the standard library alone.

What the CLI's short-lived commands use (`snapfleet submit/jobs/logs/cancel/status`
and the GitLab executor's stages): a process that makes one or two requests and
exits gains nothing from an event loop, and loses ~40 ms importing asyncio and
~150 ms importing aiohttp. Programs that already run a loop use the async
`runner.api.client.ApiClient`. One connection per request (``Connection:
close``); the protocol work is in `runner.api.wire`.
"""

from __future__ import annotations

import json
import os
import select
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from runner.api import wire
from runner.error_root import ConfigError, SnapfleetError

CONNECT_TIMEOUT_S = 5.0
# A lease not ready after this long is reported as waiting, then again every LEASE_WAIT_S.
LEASE_FIRST_WAIT_S = 1.0
LEASE_WAIT_S = 10.0
_READ = 65536


class DaemonUnavailable(SnapfleetError):
    """Nothing answers on the API socket."""


class ApiError(SnapfleetError):
    """The daemon refused a request."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_of(status: int, body: bytes) -> SnapfleetError:
    """The exception an error response means: ConfigError for 422 (naming each
    problem), else ApiError with the daemon's message."""
    try:
        parsed = json.loads(body)
        message = str(parsed.get("error", f"HTTP {status}"))
    except (ValueError, AttributeError):
        parsed, message = {}, body.decode(errors="replace") or f"HTTP {status}"
    if status == 422:
        listed = parsed.get("problems")
        problems = [(str(p[0]), str(p[1])) for p in listed if isinstance(p, list) and len(p) == 2
                    ] if isinstance(listed, list) else []
        problems = problems or [("", message)]
        return ConfigError(problems[0][0], problems[0][1], problems=problems)
    return ApiError(status, message)


def segment(text: str) -> str:
    """``text`` as one percent-encoded path segment (job ids come from the user)."""
    return quote(text, safe="")


class DaemonClient:
    """``DaemonClient(path).submit({...})``: each call is one request."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def submit(self, spec: dict[str, Any], *, secret_env: Mapping[str, str] | None = None
               ) -> dict[str, Any]:
        """Queue ``spec``; ``secret_env`` reaches the job's environment but the daemon
        keeps it in memory only (a restart before the job starts ends the job)."""
        body = dict(spec)
        if secret_env:
            body["secret_env"] = {**body.get("secret_env", {}), **secret_env}
        return self._json("POST", "/v1/jobs", body)

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self._json("GET", f"/v1/jobs?limit={limit}")["jobs"]
        return jobs

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{segment(job_id)}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{segment(job_id)}/cancel")

    def status(self) -> dict[str, Any]:
        return self._json("GET", "/v1/status")

    def acquire_lease(
        self,
        key: str,
        profile: str | None,
        timeout_s: float | None = None,
        *,
        on_wait: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Hold a VM for ``key``; waits while the daemon queues and restores it, telling
        ``on_wait`` what it waits for after a second and then every few seconds."""
        body: dict[str, Any] = {"key": key, "profile": profile, "timeout_s": timeout_s}
        if on_wait is None:
            return self._json("POST", "/v1/leases", body)
        wait_s = LEASE_FIRST_WAIT_S
        while True:
            lease = self._json("POST", "/v1/leases", {**body, "wait_s": wait_s})
            if "waiting" not in lease:  # 201: the VM is ready
                return lease
            on_wait(str(lease["waiting"]))
            wait_s = LEASE_WAIT_S

    def check_lease(self, profile: str | None) -> dict[str, Any]:
        """What would stop a lease of ``profile`` (None: the default profile):
        ``{"profile", "image", "problems": [str, ...]}``, decided by the daemon."""
        query = "" if profile is None else "?" + urlencode({"profile": profile})
        return self._json("GET", f"/v1/leases/check{query}")

    def release_lease(self, key: str) -> bool:
        return bool(self._json("DELETE", f"/v1/leases/{segment(key)}")["released"])

    def logs(self, job_id: str, *, follow: bool = False, offset: int = 0) -> Iterator[bytes]:
        """A job's log bytes as they come (until the job ends, with ``follow``)."""
        query = urlencode({"offset": str(offset), "follow": "1" if follow else "0"})
        with self._connect() as sock:
            self._send(sock, wire.request("GET", f"/v1/jobs/{segment(job_id)}/logs?{query}",
                                          headers={"Connection": "close"}))
            head, rest = self._head(sock)
            if head.status != 200:
                raise error_of(head.status, self._body(sock, head, rest))
            yield from self._stream(sock, head, rest)

    def exec_in_lease(
        self,
        key: str,
        script: str,
        on_output: Callable[[str, bytes], None],
        *,
        cancel_fd: int | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stage: str | None = None,
    ) -> dict[str, Any]:
        """Run ``script`` (stage ``stage``) in the leased VM; returns the final status frame.

        When ``cancel_fd`` becomes readable (a signal's wakeup pipe), the daemon is
        asked to stop the script; the status frame that follows still arrives.
        """
        with self._connect() as sock:
            ws_key = wire.ws_key()
            self._send(sock, wire.ws_upgrade(f"/v1/leases/{segment(key)}/exec", ws_key))
            head, rest = self._head(sock)
            if head.status != 101:
                if head.status in (404, 410):
                    raise ApiError(head.status, f"no VM is held for {key} (was prepare run?)")
                raise ApiError(head.status, f"exec refused: HTTP {head.status}")
            try:
                wire.check_upgrade(head, ws_key)
            except wire.WireError as exc:
                raise ApiError(502, f"exec refused: {exc}") from None
            request = {"script": script, "env": env, "cwd": cwd, "stage": stage}
            self._send(sock, wire.frame(wire.TEXT, json.dumps(request).encode()))
            final = self._exec_loop(sock, rest, on_output, cancel_fd)
            if final is None:
                raise ApiError(500, "the daemon closed the exec stream without a result")
            self._send(sock, wire.frame(wire.CLOSE, (1000).to_bytes(2, "big")), quiet=True)
            return final

    def _exec_loop(self, sock: socket.socket, rest: bytes,
                   on_output: Callable[[str, bytes], None], cancel_fd: int | None
                   ) -> dict[str, Any] | None:
        frames = wire.Frames()
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if cancel_fd is not None:
            poller.register(cancel_fd, select.POLLIN)
        data = rest
        while True:
            try:
                messages = frames.feed(data)
            except wire.WireError as exc:
                raise ApiError(502, f"bad exec stream from the daemon: {exc}") from None
            for msg in messages:
                if msg.opcode == wire.BINARY and msg.data[:1] in (b"\x01", b"\x02"):
                    on_output("stdout" if msg.data[:1] == b"\x01" else "stderr", msg.data[1:])
                elif msg.opcode == wire.TEXT:
                    return _final(msg.data)
                elif msg.opcode == wire.PING:
                    self._send(sock, wire.frame(wire.PONG, msg.data))
                elif msg.opcode == wire.CLOSE:
                    return None
                elif msg.opcode == wire.BINARY:
                    raise ApiError(502, "bad exec stream from the daemon: unknown stream")
            data = b""
            for fd, _event in poller.poll():
                if fd == cancel_fd:
                    os.read(fd, 512)
                    self._send(sock, wire.frame(wire.TEXT, b'{"cancel": true}'), quiet=True)
                    poller.unregister(fd)  # once is enough; the final frame follows
                else:
                    data = self._recv(sock)
                    if not data:
                        return None

    def _json(self, method: str, target: str, body: dict[str, Any] | None = None
              ) -> dict[str, Any]:
        payload = None if body is None else json.dumps(body).encode()
        with self._connect() as sock:
            self._send(sock, wire.request(method, target, body=payload,
                                          headers={"Connection": "close"}))
            head, rest = self._head(sock)
            data = self._body(sock, head, rest)
        if head.status >= 400:
            raise error_of(head.status, data)
        try:
            parsed = json.loads(data)
        except ValueError:
            raise ApiError(502, f"the daemon answered HTTP {head.status} without JSON") from None
        if not isinstance(parsed, dict):
            raise ApiError(502, f"the daemon answered HTTP {head.status} with a non-object")
        return parsed

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(str(self.socket_path))
            sock.settimeout(None)
        except OSError as exc:
            sock.close()
            raise self._unavailable(exc) from exc
        return sock

    def _head(self, sock: socket.socket) -> tuple[wire.Head, bytes]:
        buffer = b""
        while True:
            try:
                found = wire.split_head(buffer)
            except wire.WireError as exc:
                raise ApiError(502, f"bad answer from the daemon: {exc}") from None
            if found is not None:
                return found
            data = self._recv(sock)
            if not data:
                raise self._unavailable(ConnectionResetError("closed before answering"))
            buffer += data

    def _body(self, sock: socket.socket, head: wire.Head, rest: bytes) -> bytes:
        return b"".join(self._stream(sock, head, rest, limit=wire.MAX_BODY))

    def _stream(self, sock: socket.socket, head: wire.Head, rest: bytes,
                limit: int | None = None) -> Iterator[bytes]:
        try:
            length = head.body_framing()
            chunks = wire.Chunks() if length is None else None
            received = 0
            data = rest
            while True:
                if chunks is not None:
                    out = chunks.feed(data)
                else:
                    assert length is not None
                    out = data[: length - received]
                received += len(out)
                if limit is not None and received > limit:
                    raise wire.WireError(f"body longer than {limit} bytes")
                if out:
                    yield out
                if (chunks.done if chunks is not None else received == length):
                    return
                data = self._recv(sock)
                if not data:
                    raise self._unavailable(ConnectionResetError("closed mid-answer"))
        except wire.WireError as exc:
            raise ApiError(502, f"bad answer from the daemon: {exc}") from None

    def _recv(self, sock: socket.socket) -> bytes:
        try:
            return sock.recv(_READ)
        except OSError as exc:
            raise self._unavailable(exc) from exc

    def _send(self, sock: socket.socket, data: bytes, *, quiet: bool = False) -> None:
        try:
            sock.sendall(data)
        except OSError as exc:
            if not quiet:
                raise self._unavailable(exc) from exc

    def _unavailable(self, exc: Exception) -> DaemonUnavailable:
        return DaemonUnavailable(
            f"cannot reach the daemon at {self.socket_path} ({exc.__class__.__name__}):"
            " is `snapfleet serve` running?"
        )


def _final(data: bytes) -> dict[str, Any]:
    """The exec's status frame: {"error"} or one with an integer "exit"."""
    try:
        final = json.loads(data)
    except ValueError:
        final = None
    if isinstance(final, dict) and (
        isinstance(final.get("error"), str)
        or (isinstance(final.get("exit"), int) and not isinstance(final.get("exit"), bool))
    ):
        return final
    raise ApiError(502, "bad exec stream from the daemon: a malformed status frame")
