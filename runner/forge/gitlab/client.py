"""GitLab's runner API over aiohttp: one method per endpoint, failures translated.

Each method sends one request and says what GitLab answered; the loops that
retry, pace and back off live in `runner.forge.gitlab.poller`, `.session` and
`.transfer`. Every aiohttp exception and unhappy status becomes a
``runner.errors`` forge error here: ``ForgeUnavailable`` (network, 429, 5xx:
try again later, ``retry_after`` when GitLab said), ``ForgeAuthError``
(401/403: the token is wrong or the job is gone), ``ForgeError`` (anything
else). Messages name the method and path, never a token or a body we sent.

Endpoints (as gitlab-runner's ``network/gitlab.go`` uses them):
``POST /runners/verify``, ``POST /jobs/request`` (201 job, 204 none, long
poll keyed by ``last_update``), ``PATCH /jobs/:id/trace`` (``Content-Range``,
202, 416 with ``Range``), ``PUT /jobs/:id`` (200 done, 202 not yet, 412 trace
checksum mismatch), ``POST /jobs/:id/artifacts`` (multipart ``file``, 201),
``GET /jobs/:id/artifacts`` (the archive, possibly via a redirect).
"""

from __future__ import annotations

import asyncio
import json
import platform
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from runner import __version__
from runner.errors import ForgeAuthError, ForgeError, ForgeUnavailable
from runner.forge.gitlab.payload import FORGE, JobPayload
from runner.forge.gitlab.trace import Patch, parse_range
from runner.secret import Secret

LAST_UPDATE = "X-GitLab-Last-Update"
UPDATE_INTERVAL = "X-GitLab-Trace-Update-Interval"
JOB_STATUS = "Job-Status"
UPLOAD_CHUNK = 256 * 1024

FEATURES: Mapping[str, bool] = {
    # What this runner really does (``FeaturesInfo`` in gitlab-runner's network.go).
    # GitLab refuses a runner a job that needs a feature it lacks, so every
    # ``True`` here must hold and every ``False`` is a job we could not run.
    "variables": True,
    "image": False,
    "services": False,
    "artifacts": True,
    "cache": True,
    "fallback_cache_keys": True,
    "shared": False,
    "upload_multiple_artifacts": True,
    "upload_raw_artifacts": True,
    "session": False,
    "terminal": False,
    "refspecs": True,
    "masking": True,
    "proxy": False,
    "raw_variables": True,
    "artifacts_exclude": True,
    "multi_build_steps": True,
    "trace_reset": True,
    "trace_checksum": True,
    "trace_size": True,
    "vault_secrets": False,
    "cancelable": True,
    "return_exit_code": True,
    "service_variables": False,
    "service_multiple_aliases": False,
    "image_executor_opts": False,
    "service_executor_opts": False,
    "cancel_gracefully": False,
    "native_steps_integration": False,
}

EXECUTOR = "snapfleet"
SHELL = "bash"


def version_info() -> dict[str, Any]:
    """The ``info`` object gitlab-runner sends with requests (``VersionInfo``)."""
    return {
        "name": "snapfleet",
        "version": __version__,
        "revision": "",
        "platform": platform.system().lower(),
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(
            platform.machine(), platform.machine()
        ),
        "executor": EXECUTOR,
        "shell": SHELL,
        "features": dict(FEATURES),
    }


@dataclass(frozen=True)
class JobRequest:
    """What one ``POST /jobs/request`` returned: a job or none, and the queue cursor."""

    job: JobPayload | None
    last_update: str | None
    raw: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class RemoteState:
    """What GitLab said about a running job in a trace or update answer."""

    status: int
    job_status: str
    """``Job-Status``: ``running``, ``canceling``, ``canceled``, ``failed``, … or ``""``."""
    update_interval: float | None
    """``X-GitLab-Trace-Update-Interval`` in seconds, when sent and positive."""
    remote_size: int | None = None
    """From ``Range: 0-<n>``: how many trace bytes GitLab holds."""

    @property
    def cancel_requested(self) -> bool:
        """GitLab asks the runner to cancel the job (user pressed Cancel)."""
        return self.job_status == "canceling"

    @property
    def aborted(self) -> bool:
        """The job is over on GitLab's side: stop it, nothing more will be accepted."""
        return self.job_status in ("canceled", "failed") or self.status in (403, 404)


@dataclass(frozen=True)
class JobUpdate:
    """The body of ``PUT /jobs/:id`` (``UpdateJobRequest``)."""

    state: str
    """``running``, ``success`` or ``failed``."""
    checksum: str
    bytesize: int
    failure_reason: str | None = None
    exit_code: int | None = None

    def body(self, token: Secret) -> dict[str, Any]:
        """The JSON body; the job token goes in it as gitlab-runner sends it."""
        body: dict[str, Any] = {
            "token": token.reveal(),
            "state": self.state,
            "checksum": self.checksum,  # deprecated top-level copy, still read by old GitLab
            "output": {"checksum": self.checksum, "bytesize": self.bytesize},
            "info": version_info(),
        }
        if self.failure_reason:
            body["failure_reason"] = self.failure_reason
        if self.exit_code is not None:
            body["exit_code"] = self.exit_code
        return body


class GitLabClient:
    """Requests to one GitLab instance's runner API (``<url>/api/v4``)."""

    def __init__(
        self,
        url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout_s: float = 30.0,
        long_poll_timeout_s: float = 75.0,
        transfer_connect_s: float = 30.0,
        transfer_read_s: float = 300.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ForgeError(f"not an http(s) URL: {url!r}", forge=FORGE)
        self.url = url.rstrip("/")
        self.api = self.url + "/api/v4"
        self._session = session
        self._own_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        # Workhorse holds a job request up to ~50 s; leave it room to answer.
        self._long_timeout = aiohttp.ClientTimeout(total=long_poll_timeout_s)
        # Archives take as long as they take: no total, only "no progress for so long".
        self._transfer_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=transfer_connect_s, sock_read=transfer_read_s)
        self._transfer_read_s = transfer_read_s
        self._headers = {"User-Agent": f"snapfleet/{__version__}"}

    async def __aenter__(self) -> GitLabClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session if this client made it."""
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _send(
        self,
        method: str,
        path: str,
        *,
        what: str,
        timeout: aiohttp.ClientTimeout | None = None,
        **kw: Any,
    ) -> tuple[int, Mapping[str, str], bytes]:
        headers = {**self._headers, **kw.pop("headers", {})}
        try:
            async with self._http().request(
                method, self.api + path, headers=headers, timeout=timeout or self._timeout, **kw
            ) as resp:
                return resp.status, resp.headers, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ForgeUnavailable(f"{what}: {type(exc).__name__}: {exc}", forge=FORGE) from exc

    # -- runner -------------------------------------------------------------

    async def verify(self, token: Secret, *, system_id: str) -> int | None:
        """Check a runner token (``POST /runners/verify``); the runner's id when sent."""
        what = "POST /runners/verify"
        status, headers, raw = await self._send(
            "POST", "/runners/verify", what=what,
            json={"token": token.reveal(), "system_id": system_id},
        )
        if status == 200:
            data = _json(raw)
            rid = data.get("id") if isinstance(data, dict) else None
            return rid if isinstance(rid, int) else None
        raise _failure(what, status, headers, raw)

    async def request_job(
        self, token: Secret, *, system_id: str, last_update: str | None = None
    ) -> JobRequest:
        """Ask for a job once (``POST /jobs/request``); GitLab may hold it as a long poll.

        A malformed job raises `runner.errors.JobPayloadError` (with the job's id
        and token when readable, so it can be failed); 409 (another runner won
        the race) is "no job".
        """
        what = "POST /jobs/request"
        body: dict[str, Any] = {
            "token": token.reveal(), "system_id": system_id, "info": version_info(),
        }
        headers = {}
        if last_update:
            body["last_update"] = last_update
            headers[LAST_UPDATE] = last_update
        status, resp_headers, raw = await self._send(
            "POST", "/jobs/request", what=what, json=body, headers=headers,
            timeout=self._long_timeout,
        )
        cursor = resp_headers.get(LAST_UPDATE) or last_update
        if status == 201:
            return JobRequest(JobPayload.parse(raw), cursor, raw)
        if status in (204, 409):
            return JobRequest(None, cursor)
        raise _failure(what, status, resp_headers, raw)

    # -- one job --------------------------------------------------------------

    async def patch_trace(self, job_id: int, job_token: Secret, patch: Patch) -> RemoteState:
        """Send one trace patch (``PATCH /jobs/:id/trace``) and report GitLab's answer.

        202, 403, 404 and 416 are answers (see `RemoteState`); 429, 5xx and
        network failures raise ``ForgeUnavailable``.
        """
        what = f"PATCH /jobs/{job_id}/trace"
        status, headers, raw = await self._send(
            "PATCH", f"/jobs/{job_id}/trace", what=what, data=patch.data,
            headers={
                "JOB-TOKEN": job_token.reveal(),
                "Content-Range": patch.content_range,
                "Content-Type": "text/plain",
            },
        )
        if status in (202, 403, 404, 416):
            return _remote_state(status, headers)
        raise _failure(what, status, headers, raw)

    async def update_job(self, job_id: int, job_token: Secret, update: JobUpdate) -> RemoteState:
        """Report the job's state (``PUT /jobs/:id``) and GitLab's answer.

        200 (done), 202 (accepted, not yet done: ask again), 412 (trace checksum
        mismatch: resend the trace), 403 and 404 (job gone) are answers; 429,
        5xx and network failures raise ``ForgeUnavailable``.
        """
        what = f"PUT /jobs/{job_id}"
        status, headers, raw = await self._send(
            "PUT", f"/jobs/{job_id}", what=what, json=update.body(job_token)
        )
        if status in (200, 202, 403, 404, 412):
            return _remote_state(status, headers)
        raise _failure(what, status, headers, raw)

    async def upload_artifact(
        self,
        job_id: int,
        job_token: Secret,
        data: bytes,
        *,
        filename: str,
        artifact_type: str = "archive",
        artifact_format: str = "zip",
        expire_in: str = "",
    ) -> None:
        """Upload one artifacts archive (``POST /jobs/:id/artifacts``, multipart ``file``).

        No total timeout: the body goes out in chunks and the upload fails
        only when a chunk waits ``transfer_read_s`` to be taken, the connect
        takes ``transfer_connect_s``, or GitLab's answer stalls that long.
        """
        what = f"POST /jobs/{job_id}/artifacts"
        params = {"artifact_type": artifact_type, "artifact_format": artifact_format}
        if expire_in:
            params["expire_in"] = expire_in
        try:
            async with asyncio.timeout(None) as stall:
                form = aiohttp.FormData()
                form.add_field("file", self._paced(data, stall), filename=filename,
                               content_type="application/octet-stream")
                status, headers, raw = await self._send(
                    "POST", f"/jobs/{job_id}/artifacts", what=what, data=form, params=params,
                    headers={"JOB-TOKEN": job_token.reveal()}, timeout=self._transfer_timeout,
                )
        except TimeoutError as exc:
            raise ForgeUnavailable(
                f"{what}: the upload made no progress for {self._transfer_read_s:g} s",
                forge=FORGE) from exc
        if status == 201:
            return
        if status == 413:
            raise ForgeError(f"{what}: 413 archive too large", forge=FORGE, status=status)
        raise _failure(what, status, headers, raw)

    async def _paced(self, data: bytes, stall: asyncio.Timeout) -> AsyncIterator[bytes]:
        """``data`` in chunks, each re-arming ``stall``: it fires if one is not taken in time."""
        loop = asyncio.get_running_loop()
        for start in range(0, len(data), UPLOAD_CHUNK):
            stall.reschedule(loop.time() + self._transfer_read_s)
            yield data[start : start + UPLOAD_CHUNK]
        stall.reschedule(None)  # the body is out: waiting for the answer is sock_read's

    async def download_artifacts(self, job_id: int, token: Secret, dest: Path) -> int:
        """Save job ``job_id``'s artifacts archive to ``dest``; returns its size.

        ``token`` is the dependency's token from the payload. A redirect (to
        object storage) is followed without the token: it is GitLab's alone.
        No total timeout: it fails when connecting or any read stalls (see
        ``transfer_connect_s``/``transfer_read_s``).
        """
        what = f"GET /jobs/{job_id}/artifacts"
        url = f"{self.api}/jobs/{job_id}/artifacts"
        headers = {**self._headers, "JOB-TOKEN": token.reveal()}
        try:
            for _hop in range(5):
                async with self._http().get(
                    url, headers=headers, allow_redirects=False, timeout=self._transfer_timeout
                ) as resp:
                    if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                        url = urljoin(url, resp.headers["Location"])
                        if urlsplit(url).netloc != urlsplit(self.api).netloc:
                            headers = dict(self._headers)
                        continue
                    if resp.status != 200:
                        raise _failure(what, resp.status, resp.headers, await resp.read())
                    return await _save(resp, dest)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ForgeUnavailable(f"{what}: {type(exc).__name__}: {exc}", forge=FORGE) from exc
        raise ForgeError(f"{what}: too many redirects", forge=FORGE)


async def _save(resp: aiohttp.ClientResponse, dest: Path) -> int:
    tmp = dest.with_name(dest.name + ".part")
    size = 0
    try:
        with tmp.open("wb") as f:
            async for chunk in resp.content.iter_chunked(256 * 1024):
                f.write(chunk)
                size += len(chunk)
        await asyncio.to_thread(tmp.replace, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a broken download leaves nothing behind
        raise
    return size


def _remote_state(status: int, headers: Mapping[str, str]) -> RemoteState:
    raw_interval = headers.get(UPDATE_INTERVAL, "")
    try:
        interval: float | None = float(int(raw_interval))
    except ValueError:
        interval = None
    return RemoteState(
        status=status,
        job_status=headers.get(JOB_STATUS, "").strip().lower(),
        update_interval=interval if interval and interval > 0 else None,
        remote_size=parse_range(headers.get("Range")),
    )


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _message(raw: bytes) -> str:
    """GitLab's ``message``/``error`` field, cut short; it never echoes our token."""
    data = _json(raw)
    if isinstance(data, dict):
        text = data.get("message") or data.get("error") or ""
        return (text if isinstance(text, str) else json.dumps(text))[:200]
    return ""


def _failure(what: str, status: int, headers: Mapping[str, str], raw: bytes) -> ForgeError:
    message = f"{what}: {status} {_message(raw)}".rstrip()
    if status == 429 or status >= 500:
        retry = headers.get("Retry-After", "")
        return ForgeUnavailable(
            message, forge=FORGE, status=status,
            retry_after=float(retry) if retry.isdigit() else None,
        )
    if status in (401, 403):
        return ForgeAuthError(message, forge=FORGE, status=status)
    return ForgeError(message, forge=FORGE, status=status)
