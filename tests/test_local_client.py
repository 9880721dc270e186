"""`runner.api.local.DaemonClient` (blocking, stdlib) against real aiohttp servers.

The daemon's API is aiohttp, so each test serves a small aiohttp app on a unix
socket in a temp dir, shaped like the daemon's routes, and drives the client
from a thread as the CLI would. The end-to-end path through the real daemon is
in tests/test_gitlab_executor.py and tests/test_daemon.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from runner.api.local import ApiError, DaemonClient, DaemonUnavailable
from runner.errors import ConfigError


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, routes: list[web.RouteDef]) -> AsyncIterator[DaemonClient]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    path = tmp_path / "api.sock"
    await web.UnixSite(runner, str(path)).start()
    try:
        yield DaemonClient(path)
    finally:
        await runner.cleanup()


async def test_json_requests_carry_their_body_and_query(tmp_path: Path) -> None:
    seen: list[tuple[str, str, Any]] = []

    async def jobs(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        seen.append((request.method, request.path_qs, body))
        return web.json_response({"id": "j1", "jobs": [{"id": "j1"}]}, status=201)

    async with serving(tmp_path, [web.post("/v1/jobs", jobs), web.get("/v1/jobs", jobs),
                                  web.post("/v1/jobs/{id}/cancel", jobs)]) as api:
        job = await asyncio.to_thread(api.submit, {"script": "true"}, secret_env={"S": "x"})
        rows = await asyncio.to_thread(api.jobs, 7)
        await asyncio.to_thread(api.cancel, "a/b c")
    assert job["id"] == "j1"
    assert rows == [{"id": "j1"}]
    assert seen == [
        ("POST", "/v1/jobs", {"script": "true", "secret_env": {"S": "x"}}),
        ("GET", "/v1/jobs?limit=7", None),
        ("POST", "/v1/jobs/a%2Fb%20c/cancel", None),  # a user's job id stays one segment
    ]


async def test_errors_become_the_exceptions_the_cli_reports(tmp_path: Path) -> None:
    async def refuse(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if code == 422:
            return web.json_response({"error": "bad", "problems": [["profile", "unknown"],
                                                                   ["timeout_s", "too long"]]},
                                     status=422)
        if code == 500:
            return web.Response(text="plain failure", status=500)
        if code == 499:  # a 422 whose problems are not pairs still says something
            return web.json_response({"error": "odd", "problems": [[1], "x", None]}, status=422)
        return web.json_response({"error": f"refused {code}"}, status=code)

    async with serving(tmp_path, [web.get("/v1/jobs/{code}", refuse)]) as api:
        with pytest.raises(ConfigError) as config:
            await asyncio.to_thread(api.job, "422")
        with pytest.raises(ApiError, match="refused 404") as missing:
            await asyncio.to_thread(api.job, "404")
        with pytest.raises(ApiError, match="plain failure"):
            await asyncio.to_thread(api.job, "500")
        with pytest.raises(ConfigError, match=r"^odd$"):
            await asyncio.to_thread(api.job, "499")
    assert config.value.problems == [("profile", "unknown"), ("timeout_s", "too long")]
    assert missing.value.status == 404


def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnavailable, match=r"cannot reach the daemon at .*api.sock"
                                                r" \(FileNotFoundError\): is `snapfleet serve`"):
        DaemonClient(tmp_path / "api.sock").status()


async def test_a_daemon_that_hangs_up_mid_answer_is_unavailable(tmp_path: Path) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"par")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(cut, str(tmp_path / "api.sock"))
    async with server:
        with pytest.raises(DaemonUnavailable, match="ConnectionResetError"):
            await asyncio.to_thread(DaemonClient(tmp_path / "api.sock").status)


async def test_logs_arrive_as_they_are_written(tmp_path: Path) -> None:
    """A followed log is yielded chunk by chunk, not when the response ends."""
    release = asyncio.Event()

    async def logs(request: web.Request) -> web.StreamResponse:
        assert request.query["follow"] == "1"
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first line\n")
        await release.wait()
        await response.write(b"x" * 200_000)
        await response.write_eof()
        return response

    loop = asyncio.get_running_loop()
    got: list[bytes] = []

    def follow(api: DaemonClient) -> None:
        for chunk in api.logs("j1", follow=True):
            got.append(chunk)
            if chunk == b"first line\n":
                loop.call_soon_threadsafe(release.set)

    async with serving(tmp_path, [web.get("/v1/jobs/{id}/logs", logs)]) as api:
        await asyncio.wait_for(asyncio.to_thread(follow, api), 30)
    assert got[0] == b"first line\n"
    assert b"".join(got) == b"first line\n" + b"x" * 200_000


ExecHandler = Callable[[web.WebSocketResponse, dict[str, Any]], Any]


def exec_route(handler: ExecHandler, *, heartbeat: float | None = None) -> web.RouteDef:
    async def execute(request: web.Request) -> web.StreamResponse:
        if request.match_info["key"] == "gone":
            return web.json_response({"error": "gone"}, status=410)
        ws = web.WebSocketResponse(heartbeat=heartbeat)
        await ws.prepare(request)
        first = json.loads(await ws.receive_str(timeout=10))
        await handler(ws, first)
        await ws.close()
        return ws

    return web.get("/v1/leases/{key}/exec", execute)


def run_exec(api: DaemonClient, key: str = "gl:k", **kw: Any
             ) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    output: list[tuple[str, bytes]] = []
    final = api.exec_in_lease(key, "echo hi", lambda s, d: output.append((s, d)), **kw)
    return final, output


async def test_exec_streams_both_streams_then_the_status(tmp_path: Path) -> None:
    big = bytes(range(256)) * 1024  # 256 KiB: a frame with a 64-bit length

    async def handler(ws: web.WebSocketResponse, first: dict[str, Any]) -> None:
        assert first == {"script": "echo hi", "env": None, "cwd": None, "stage": "build"}
        await ws.send_bytes(b"\x01hi\n")
        await ws.send_bytes(b"\x02warn\n")
        await ws.send_bytes(b"\x01" + big)
        await ws.send_json({"state": "failed", "exit_code": 3, "exit": 3})

    async with serving(tmp_path, [exec_route(handler)]) as api:
        final, output = await asyncio.to_thread(run_exec, api, stage="build")
    assert final == {"state": "failed", "exit_code": 3, "exit": 3}
    assert output == [("stdout", b"hi\n"), ("stderr", b"warn\n"), ("stdout", big)]


async def test_exec_answers_the_servers_pings(tmp_path: Path) -> None:
    """aiohttp closes a WebSocket whose client misses a pong; a long stage must live."""

    async def handler(ws: web.WebSocketResponse, first: dict[str, Any]) -> None:
        for _ in range(8):  # 1.6 s, eight heartbeats of 0.2 s
            await ws.send_bytes(b"\x01.")
            await asyncio.sleep(0.2)
        await ws.send_json({"exit": 0})

    async with serving(tmp_path, [exec_route(handler, heartbeat=0.2)]) as api:
        final, output = await asyncio.to_thread(run_exec, api)
    assert final == {"exit": 0}
    assert len(output) == 8


async def test_exec_cancel_fd_asks_the_daemon_to_stop_and_waits_for_the_status(
    tmp_path: Path,
) -> None:
    async def handler(ws: web.WebSocketResponse, first: dict[str, Any]) -> None:
        await ws.send_bytes(b"\x01started\n")
        msg = await ws.receive(timeout=10)
        assert msg.type == WSMsgType.TEXT
        assert json.loads(msg.data) == {"cancel": True}
        await ws.send_json({"state": "cancelled", "exit": 130, "cancelled": True})

    read_fd, write_fd = os.pipe()
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    def on_output(stream: str, data: bytes) -> None:
        loop.call_soon_threadsafe(started.set)

    async with serving(tmp_path, [exec_route(handler)]) as api:
        running = asyncio.create_task(asyncio.to_thread(
            api.exec_in_lease, "gl:k", "sleep 60", on_output, cancel_fd=read_fd))
        await asyncio.wait_for(started.wait(), 10)
        os.write(write_fd, b"\x0f")  # what a SIGTERM does through set_wakeup_fd
        final = await asyncio.wait_for(running, 10)
    os.close(read_fd)
    os.close(write_fd)
    assert final["cancelled"] is True
    assert final["exit"] == 130


async def test_exec_without_a_status_frame_or_lease_is_an_api_error(tmp_path: Path) -> None:
    async def hang_up(ws: web.WebSocketResponse, first: dict[str, Any]) -> None:
        await ws.send_bytes(b"\x01partial")

    async def nonsense(ws: web.WebSocketResponse, first: dict[str, Any]) -> None:
        await ws.send_str('{"state": "done"}')

    for handler, message in [(hang_up, "closed the exec stream without a result"),
                             (nonsense, "malformed status frame")]:
        async with serving(tmp_path, [exec_route(handler)]) as api:
            with pytest.raises(ApiError, match=message):
                await asyncio.to_thread(run_exec, api)
    async with serving(tmp_path, [exec_route(hang_up)]) as api:
        with pytest.raises(ApiError, match=r"no VM is held for gone \(was prepare run\?\)"):
            await asyncio.to_thread(run_exec, api, "gone")


def test_sigterm_during_exec_goes_to_the_cancel_fd_not_a_traceback(tmp_path: Path) -> None:
    """The executor's wiring: a signal while blocked in the client wakes its poll."""
    from runner.forge.gitlab_executor import _signals_to_fd

    before = signal.getsignal(signal.SIGTERM)
    with _signals_to_fd(signal.SIGTERM) as (fd, caught):
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        assert select.select([fd], [], [], 10)[0] == [fd]
    assert caught == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) == before  # restored on the way out
