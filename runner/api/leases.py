"""Lease routes of the control API (used by the GitLab custom executor).

    POST   /v1/leases                 {"key", "profile"?} → hold a VM (waits for it)   201
    DELETE /v1/leases/{key}           destroy it (idempotent)                          200
    GET    /v1/leases/{key}/exec      WebSocket: send {"script", "env"?, "cwd"?};
                                      receive binary frames (1 byte stream: 1 stdout,
                                      2 stderr, then data) and one final JSON text frame
                                      {"exit_code", "signal", "timed_out", "cancelled"}
                                      or {"error"}. Send {"cancel": true}, or close, to
                                      stop the script (its process group gets SIGTERM,
                                      then SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

from aiohttp import WSMsgType, web

from runner.errors import AgentError, ConfigError, SnapfleetError
from runner.limits import load_json
from runner.service.jobs import ExecRequest
from runner.vm.agent_client import ExecSession

STREAMS = {"stdout": b"\x01", "stderr": b"\x02"}


def add_routes(app: web.Application, daemon_key: Any) -> None:
    async def acquire(request: web.Request) -> web.Response:
        from runner.service.daemon import Draining

        try:
            body = load_json(await request.read())
            key, profile = body["key"], body.get("profile")
        except (ValueError, KeyError, TypeError, AttributeError):
            return web.json_response({"error": "expected JSON {key, profile?}"}, status=400)
        if not isinstance(key, str) or not isinstance(profile, str | None):
            return web.json_response({"error": "key and profile must be strings"}, status=400)
        try:
            lease = await request.app[daemon_key].acquire_lease(key, profile)
        except ConfigError as exc:
            return web.json_response({"error": str(exc), "problems": exc.problems}, status=422)
        except Draining as exc:
            return web.json_response({"error": str(exc)}, status=503)
        except SnapfleetError as exc:
            return web.json_response({"error": str(exc)}, status=500)
        return web.json_response(lease.describe(), status=201)

    async def release(request: web.Request) -> web.Response:
        released = await request.app[daemon_key].release_lease(request.match_info["key"])
        return web.json_response({"released": released})

    async def execute(request: web.Request) -> web.StreamResponse:
        daemon = request.app[daemon_key]
        key = request.match_info["key"]
        lease = daemon.leases.get(key)
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
            session = await lease.machine.exec(
                script=req.script, shell=daemon.settings.gitlab.shell, env=req.env, cwd=req.cwd,
            )
        except (TimeoutError, ValueError, TypeError):
            await ws.send_json({"error": "expected {script, env?, cwd?} first"})
            await ws.close()
            return ws
        except SnapfleetError as exc:  # ConfigError: the request names what is wrong
            await ws.send_json({"error": str(exc)})
            await ws.close()
            return ws
        watcher = asyncio.create_task(_cancel_on_request(ws, session))
        try:
            async for chunk in session:
                await ws.send_bytes(STREAMS[chunk.stream] + chunk.data)
            result = await session.wait()
            await ws.send_json({"exit_code": result.exit_code, "signal": result.signal,
                                "timed_out": result.timed_out, "cancelled": result.cancelled})
        except AgentError as exc:
            error = await lease.machine.died_error(exc)
            with contextlib.suppress(ConnectionError):
                await ws.send_json({"error": str(error)})
        except ConnectionError:
            await session.cancel(signal.SIGTERM)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await ws.close()
        return ws

    app.add_routes([
        web.post("/v1/leases", acquire),
        web.delete("/v1/leases/{key}", release),
        web.get("/v1/leases/{key}/exec", execute),
    ])


async def _cancel_on_request(ws: web.WebSocketResponse, session: ExecSession) -> None:
    """Stop the script when the client asks, or goes away."""
    async for msg in ws:
        if msg.type == WSMsgType.TEXT and _asks_to_cancel(msg.data):
            break
    if not session.done:
        with contextlib.suppress(SnapfleetError):
            await session.cancel(signal.SIGTERM)


def _asks_to_cancel(text: str) -> bool:
    try:
        body = load_json(text)
    except ValueError:
        return False
    return isinstance(body, dict) and bool(body.get("cancel"))
