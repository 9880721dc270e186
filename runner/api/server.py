"""The daemon's local control API: aiohttp on a unix socket only root (or one group) can use.

    POST /v1/jobs                 submit a job spec (JSON)      201 | 400 | 422 | 503
    GET  /v1/jobs[?limit=N]       recent jobs
    GET  /v1/jobs/{id}            one job and its transitions   200 | 404
    GET  /v1/jobs/{id}/logs       log bytes (?offset=N&follow=1 streams until the job ends)
    POST /v1/jobs/{id}/cancel     cancel a queued or running job 202 | 404
    GET  /v1/status               capacity, running, queued, VMs
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from runner.api import leases
from runner.errors import ConfigError, HostError
from runner.limits import load_json
from runner.service.jobs import JobSpec

if TYPE_CHECKING:
    from runner.service.daemon import Daemon

DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")


def build_app(daemon: Daemon) -> web.Application:
    app = web.Application(client_max_size=4 * 2**20)
    app[DAEMON] = daemon
    app.add_routes([
        web.post("/v1/jobs", submit),
        web.get("/v1/jobs", list_jobs),
        web.get("/v1/jobs/{id}", get_job),
        web.get("/v1/jobs/{id}/logs", job_logs),
        web.post("/v1/jobs/{id}/cancel", cancel_job),
        web.get("/v1/status", status),
    ])
    leases.add_routes(app, DAEMON)
    return app


def _error(status: int, message: str, problems: list[tuple[str, str]] | None = None
           ) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if problems:
        body["problems"] = [list(p) for p in problems]
    return web.json_response(body, status=status)


async def submit(request: web.Request) -> web.Response:
    from runner.service.daemon import Draining

    try:
        data = load_json(await request.read())
    except ValueError as exc:
        return _error(400, f"request body is not valid JSON: {exc}")
    try:
        spec = JobSpec.parse(data)
        job = await request.app[DAEMON].submit(spec)
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
    jobs = await request.app[DAEMON].store.jobs(limit=max(1, min(limit, 10_000)))
    return web.json_response({"jobs": [j.public() for j in jobs]})


async def get_job(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    job = await daemon.job(request.match_info["id"])
    if job is None:
        return _error(404, f"no job {request.match_info['id']}")
    body = job.public()
    body["history"] = [
        {"state": s, "at": at, "reason": reason} for s, at, reason in
        await daemon.store.history(job.id)
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

    def finished() -> bool:
        return job_id not in daemon.jobs  # unfinished jobs live there until their log closed

    async for chunk in daemon.logs.follow(job_id, offset, finished=finished if follow else None):
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
async def serve_api(daemon: Daemon, path: Path, group: str | None) -> AsyncIterator[None]:
    """Serve the API on ``path`` for as long as the context lasts."""
    sock = bind_unix(path, group)
    runner = web.AppRunner(build_app(daemon), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield
    finally:
        await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def bind_unix(path: Path, group: str | None) -> socket.socket:
    """A listening unix socket at ``path``: mode 0600, or 0660 owned by ``group``.

    The mode is set by the umask at bind time, so there is no moment when other
    users could connect. A live socket (another daemon) is an error; a stale one
    is replaced.
    """
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise HostError(f"another snapfleet daemon is already serving {path}")
        finally:
            probe.close()
    gid = None
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError("daemon.api_group", f"no group named {group!r}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    sock.listen(128)
    sock.setblocking(False)
    return sock
