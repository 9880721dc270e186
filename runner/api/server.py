"""The daemon's local control API: aiohttp on a unix socket only root (or one group) can use.

    POST /v1/jobs                 submit a job spec (JSON)      201 | 400 | 422 | 503
                                  (``secret_env``: env kept in memory only, never stored)
    GET  /v1/jobs[?limit=N]       recent jobs
    GET  /v1/jobs/{id}            one job and its transitions   200 | 404
    GET  /v1/jobs/{id}/logs       log bytes (?offset=N&follow=1 streams until the job ends)
    POST /v1/jobs/{id}/cancel     cancel a queued or running job 202 | 404
    GET  /v1/status               capacity, running, queued, VMs, what each source adds

Lease routes (GitLab's custom executor) are in `runner.api.leases`. `LocalApi` is
the job source (``source = "local"``) that serves all of them.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from runner.api import leases
from runner.errors import ConfigError, Draining
from runner.limits import load_json
from runner.listen import bind_unix, group_id, remove_own_socket
from runner.service.jobs import parse_submission

if TYPE_CHECKING:
    from runner.service.leases import LeaseBook
    from runner.service.port import JobPort

DAEMON: web.AppKey[JobPort] = web.AppKey("daemon")


class LocalApi:
    """The job source of the local control API (`snapfleet submit`, the executor)."""

    name = "local"
    requeue_on_restart = True  # a queued local job is all in the store (but secrets)

    def __init__(self, port: JobPort, leases: LeaseBook) -> None:
        self._port = port
        self._leases = leases

    def open(self) -> contextlib.AbstractAsyncContextManager[None]:
        daemon = self._port.settings.daemon
        return serve_api(build_app(self._port, self._leases), daemon.api_socket,
                         daemon.api_group)

    def status(self) -> dict[str, Any]:
        return {}


def build_app(port: JobPort, lease_book: LeaseBook) -> web.Application:
    app = web.Application(client_max_size=4 * 2**20)
    app[DAEMON] = port
    app.add_routes([
        web.post("/v1/jobs", submit),
        web.get("/v1/jobs", list_jobs),
        web.get("/v1/jobs/{id}", get_job),
        web.get("/v1/jobs/{id}/logs", job_logs),
        web.post("/v1/jobs/{id}/cancel", cancel_job),
        web.get("/v1/status", status),
    ])
    leases.add_routes(app, lease_book)
    return app


def _error(status: int, message: str, problems: list[tuple[str, str]] | None = None
           ) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if problems:
        body["problems"] = [list(p) for p in problems]
    return web.json_response(body, status=status)


async def submit(request: web.Request) -> web.Response:
    try:
        data = load_json(await request.read())
    except ValueError as exc:
        return _error(400, f"request body is not valid JSON: {exc}")
    try:
        spec, secret_env = parse_submission(data)
        job = await request.app[DAEMON].submit(spec, source=LocalApi.name, secret_env=secret_env)
    except ConfigError as exc:
        return _error(422, str(exc), exc.problems)
    except Draining as exc:
        return _error(503, str(exc))
    return web.json_response(job.public(), status=201)


async def list_jobs(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        return _error(400, "limit must be an integer")
    jobs = await request.app[DAEMON].recent_jobs(max(1, min(limit, 10_000)))
    return web.json_response({"jobs": [j.public() for j in jobs]})


async def get_job(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    job = await daemon.job(request.match_info["id"])
    if job is None:
        return _error(404, f"no job {request.match_info['id']}")
    body = job.public()
    body["history"] = [
        {"state": s, "at": at, "reason": reason} for s, at, reason in
        await daemon.history(job.id)
    ]
    return web.json_response(body)


async def job_logs(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON]
    job_id = request.match_info["id"]
    if await daemon.job(job_id) is None:
        return _error(404, f"no job {job_id}")
    try:
        offset = int(request.query.get("offset", "0"))
    except ValueError:
        return _error(400, "offset must be an integer")
    follow = request.query.get("follow") in ("1", "true")
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    await response.prepare(request)

    async for chunk in daemon.follow_log(job_id, offset, follow=follow):
        await response.write(chunk)
    await response.write_eof()
    return response


async def cancel_job(request: web.Request) -> web.Response:
    try:
        job = await request.app[DAEMON].cancel(request.match_info["id"])
    except KeyError:
        return _error(404, f"no job {request.match_info['id']}")
    return web.json_response(job.public(), status=202)


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[DAEMON].status())


@contextlib.asynccontextmanager
async def serve_api(app: web.Application, path: Path, group: str | None
                    ) -> AsyncIterator[None]:
    """Serve ``app`` on ``path`` for as long as the context lasts."""
    sock = bind_api_socket(path, group)
    bound = os.stat(path)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield
    finally:
        await runner.cleanup()
        remove_own_socket(path, bound)


def bind_api_socket(path: Path, group: str | None) -> socket.socket:
    """The API's listening socket: mode 0600, or 0660 owned by ``group``."""
    gid = group_id(group)
    return bind_unix(path, gid=gid, mode=0o600 if gid is None else 0o660, what="API",
                     key="daemon.api_socket")
