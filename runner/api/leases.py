"""Lease routes of the control API (used by the GitLab custom executor).

    POST   /v1/leases                 {"key", "profile"?, "timeout_s"?, "wait_s"?} →
                                      hold a VM (waits for it)                        201
                                      not ready within wait_s: the lease so far and
                                      "waiting" (why, in words); ask again            202
    DELETE /v1/leases/{key}           destroy it (idempotent)                          200
    GET    /v1/leases/check?profile=P what would stop a job of profile P (default: the
                                      default profile) here, before any VM is asked for:
                                      {"profile", "image", "problems": [line, ...]}    200
    GET    /v1/leases/{key}/exec      WebSocket: send {"script", "env"?, "cwd"?, "stage"?};
                                      receive binary frames (1 byte stream: 1 stdout,
                                      2 stderr, then data; stage scripts run with
                                      stderr on stdout, one stream as GitLab's trace)
                                      and one final JSON text frame
                                      {"state", "exit_code", "exit", "reason", "signal",
                                      "timed_out", "cancelled"} or {"error"}. Send
                                      {"cancel": true}, or close, to stop the script (its
                                      process group gets SIGTERM, then SIGKILL). The stage
                                      runs through the lease's job: logged, bounded by its
                                      timeout, its result recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from aiohttp import WSMsgType, web

from runner.errors import ConfigError, Draining, SnapfleetError
from runner.execution import Command, exit_code
from runner.limits import load_json
from runner.service.jobs import ExecRequest, JobState

if TYPE_CHECKING:
    from runner.service.leases import LeaseBook

STREAMS = {"stdout": b"\x01", "stderr": b"\x02"}
ONE_STREAM = "exec 2>&1\n"


def add_routes(app: web.Application, book: LeaseBook) -> None:
    async def acquire(request: web.Request) -> web.Response:
        try:
            body = load_json(await request.read())
            key, profile = body["key"], body.get("profile")
            timeout = body.get("timeout_s")
            wait = body.get("wait_s")
        except (ValueError, KeyError, TypeError, AttributeError):
            return web.json_response({"error": "expected JSON {key, profile?}"}, status=400)
        if not isinstance(key, str) or not isinstance(profile, str | None):
            return web.json_response({"error": "key and profile must be strings"}, status=400)
        if wait is not None and (
            isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= 300
        ):
            return web.json_response(
                {"error": "wait_s must be a number of seconds up to 300"}, status=400
            )
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float)
            or not 0 < timeout <= 7 * 86400
        ):
            return web.json_response(
                {"error": "timeout_s must be a number of seconds up to 7 days"}, status=400
            )
        try:
            lease = await book.acquire(key, profile, timeout, wait_s=wait)
        except ConfigError as exc:
            return web.json_response({"error": str(exc), "problems": exc.problems}, status=422)
        except Draining as exc:
            return web.json_response({"error": str(exc)}, status=503)
        except SnapfleetError as exc:
            return web.json_response({"error": str(exc)}, status=500)
        if not lease.ready.done():
            # Not ready within wait_s: say why, and the driver asks again with the key.
            return web.json_response({**lease.describe(), "waiting": book.waiting(lease)},
                                     status=202)
        return web.json_response(lease.describe(), status=201)

    async def check(request: web.Request) -> web.Response:
        return web.json_response(await book.check(request.query.get("profile") or None))

    async def release(request: web.Request) -> web.Response:
        released = await book.release(request.match_info["key"])
        return web.json_response({"released": released})

    async def execute(request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        lease = book.by_key.get(key)
        if lease is None:
            return web.json_response({"error": f"no VM is held for {key}"}, status=404)
        if lease.ended is not None or lease.machine is None:
            return web.json_response(
                {"error": f"the VM held for {key} is gone: {lease.ended}"}, status=410
            )
        ws = web.WebSocketResponse(heartbeat=30)
        await ws.prepare(request)
        try:
            req = ExecRequest.parse(load_json(await ws.receive_str(timeout=30)))
        except (TimeoutError, ValueError, TypeError):
            await ws.send_json({"error": "expected {script, env?, cwd?, stage?} first"})
            await ws.close()
            return ws
        except SnapfleetError as exc:  # ConfigError: the request names what is wrong
            await ws.send_json({"error": str(exc)})
            await ws.close()
            return ws
        # A GitLab trace is one stream: stdout and stderr share one pipe in the guest, so
        # lines written back to back reach the trace in the order they were written.
        command = Command(script=ONE_STREAM + req.script, env=req.env or {}, cwd=req.cwd,
                          shell=book.shell)
        cancel = asyncio.Event()
        watcher = asyncio.create_task(_cancel_on_request(ws, cancel))

        async def send(stream: str, data: bytes) -> None:
            with contextlib.suppress(ConnectionError):
                await ws.send_bytes(STREAMS[stream] + data)

        try:
            outcome = await book.exec(key, command, send, stage=req.stage or "script",
                                      cancel=cancel)
        except (LookupError, SnapfleetError) as exc:
            with contextlib.suppress(ConnectionError):
                await ws.send_json({"error": str(exc)})
        else:
            final = {
                "state": str(outcome.state), "exit_code": outcome.exit_code,
                "exit": exit_code(outcome), "reason": outcome.reason,
                "signal": outcome.signal,
                "timed_out": outcome.state is JobState.TIMED_OUT,
                "cancelled": outcome.state is JobState.CANCELLED,
            }
            if outcome.state is JobState.SYSTEM_FAILURE:
                final = {"error": outcome.reason or "the VM failed"}
            with contextlib.suppress(ConnectionError):
                await ws.send_json(final)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await ws.close()
        return ws

    app.add_routes([
        web.post("/v1/leases", acquire),
        web.get("/v1/leases/check", check),
        web.delete("/v1/leases/{key}", release),
        web.get("/v1/leases/{key}/exec", execute),
    ])


async def _cancel_on_request(ws: web.WebSocketResponse, cancel: asyncio.Event) -> None:
    """Stop the script when the client asks, or goes away."""
    async for msg in ws:
        if msg.type == WSMsgType.TEXT and _asks_to_cancel(msg.data):
            break
    cancel.set()


def _asks_to_cancel(text: str) -> bool:
    try:
        body = load_json(text)
    except ValueError:
        return False
    return isinstance(body, dict) and bool(body.get("cancel"))
