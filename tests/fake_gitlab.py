"""A fake GitLab runner API: a real aiohttp server that checks what clients send.

Shapes come from gitlab-runner's ``common/network.go`` (``JobRequest``,
``VersionInfo``/``FeaturesInfo``, ``UpdateJobRequest``) and GitLab's runner
API as Rails and Workhorse answer it: ``/jobs/request`` is a long poll keyed
by ``last_update`` (``X-GitLab-Last-Update``), ``PATCH /jobs/:id/trace``
appends at ``Content-Range``'s start or answers 416 with ``Range: 0-<size>``,
``PUT /jobs/:id`` may answer 202 before 200, ``Job-Status`` carries cancels.
Requests of the wrong shape are answered 400 and recorded in ``violations``;
tests assert that list is empty. ``faults`` queue canned statuses per endpoint.

It also serves what python-gitlab calls for ``snapfleet gitlab register``:
``POST /user/runners`` (access token) and ``DELETE /runners`` (runner token).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import secrets
import struct
import time
import zipfile
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

Json = dict[str, Any]

# FeaturesInfo in gitlab-runner's common/network.go: a client may send no other key.
KNOWN_FEATURES = frozenset({
    "variables", "image", "services", "artifacts", "cache", "fallback_cache_keys", "shared",
    "upload_multiple_artifacts", "upload_raw_artifacts", "session", "terminal", "refspecs",
    "masking", "proxy", "raw_variables", "artifacts_exclude", "multi_build_steps",
    "trace_reset", "trace_checksum", "trace_size", "vault_secrets", "cancelable",
    "return_exit_code", "service_variables", "service_multiple_aliases",
    "image_executor_opts", "service_executor_opts", "cancel_gracefully",
    "native_steps_integration",
})
FAILURE_REASONS = (
    "unknown_failure", "script_failure", "api_failure", "stuck_or_timeout_failure",
    "runner_system_failure", "missing_dependency_failure", "runner_unsupported",
    "stale_schedule", "job_execution_timeout", "archived_failure", "unmet_prerequisites",
    "scheduler_failure", "data_integrity_failure", "forward_deployment_failure",
    "user_blocked", "project_deleted", "ci_quota_exceeded", "pipeline_loop_detected",
    "no_matching_runner", "trace_size_exceeded", "builds_disabled", "environment_creation_failure",
    "deployment_rejected", "failed_outdated_deployment_job", "protected_environment_failure",
    "insufficient_bridge_permissions", "downstream_bridge_project_not_found",
    "invalid_bridge_trigger", "upstream_bridge_project_not_found",
    "insufficient_upstream_permissions", "bridge_pipeline_is_child_pipeline",
    "downstream_pipeline_creation_failed", "secrets_provider_not_found",
    "reached_max_descendant_pipelines_depth", "ip_restriction_failure",
    "reached_max_pipeline_hierarchy_size", "reached_downstream_pipeline_trigger_rate_limit",
)
_RANGE = re.compile(r"^(\d+)-(\d+)$")
# GitLab's ``Enums::Ci::JobArtifact`` type → format pairs: an upload of another
# pair is refused (``file_format`` validation), so a runner must send them as given.
ARTIFACT_FORMATS = {
    "archive": "zip", "metadata": "gzip", "trace": "raw",
    "junit": "gzip", "metrics": "gzip", "metrics_referee": "gzip", "network_referee": "gzip",
    "dotenv": "gzip", "cobertura": "gzip", "jacoco": "gzip", "cluster_applications": "gzip",
    "lsif": "zip", "cyclonedx": "gzip", "annotations": "gzip", "repository_xray": "gzip",
    "sast": "raw", "secret_detection": "raw", "dependency_scanning": "raw",
    "container_scanning": "raw", "cluster_image_scanning": "raw", "dast": "raw",
    "license_scanning": "raw", "accessibility": "raw", "codequality": "raw",
    "performance": "raw", "browser_performance": "raw", "load_performance": "raw",
    "terraform": "raw", "requirements": "raw", "requirements_v2": "raw",
    "coverage_fuzzing": "raw", "api_fuzzing": "raw",
}


def gzip_members(data: bytes) -> list[tuple[str, str, bytes]]:
    """``(FNAME, FCOMMENT, content)`` of each member of a concatenated gzip stream;
    ValueError if it is not one (RFC 1952, as GitLab's ``GzipStream`` reads it)."""
    members = []
    rest = data
    while rest:
        if len(rest) < 10 or rest[:3] != b"\x1f\x8b\x08":
            raise ValueError("not a gzip member")
        flags, pos = rest[3], 10
        if flags & 0x04:  # FEXTRA
            pos += 2 + int.from_bytes(rest[pos:pos + 2], "little")
        texts = []
        for flag in (0x08, 0x10):  # FNAME, FCOMMENT
            if flags & flag:
                end = rest.index(b"\0", pos)
                texts.append(rest[pos:end].decode("latin-1"))
                pos = end + 1
            else:
                texts.append("")
        if flags & 0x02:  # FHCRC
            pos += 2
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        content = inflate.decompress(rest[pos:])
        if not inflate.eof or len(inflate.unused_data) < 8:
            raise ValueError("truncated gzip member")
        crc, size = struct.unpack("<II", inflate.unused_data[:8])
        if crc != zlib.crc32(content) or size != len(content) & 0xFFFFFFFF:
            raise ValueError("gzip member CRC or size mismatch")
        members.append((texts[0], texts[1], content))
        rest = inflate.unused_data[8:]
    if not members:
        raise ValueError("empty gzip stream")
    return members


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VersionInfo(_Strict):
    name: str
    version: str
    revision: str = ""
    platform: str = ""
    architecture: str = ""
    executor: str = ""
    shell: str = ""
    features: dict[str, bool]
    config: Json | None = None


class JobRequestBody(_Strict):
    token: str
    system_id: str
    last_update: str | None = None
    info: VersionInfo
    session: Json | None = None


class TraceOutput(_Strict):
    checksum: str
    bytesize: int


class UpdateJobBody(_Strict):
    token: str
    state: Literal["pending", "running", "success", "failed"]
    failure_reason: str | None = None
    checksum: str | None = None
    output: TraceOutput
    exit_code: int | None = None
    info: VersionInfo | None = None


@dataclass
class Recorded:
    method: str
    path: str
    status: int
    at: float
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeJob:
    payload: Json
    status: str = "pending"
    trace: bytearray = field(default_factory=bytearray)
    updates: list[Json] = field(default_factory=list)
    artifacts: list[tuple[dict[str, str], str, bytes]] = field(default_factory=list)
    stored_artifact: bytes | None = None
    told_canceling_at: float | None = None
    """When the runner was first answered ``Job-Status: canceling`` (monotonic)."""
    ended_at: float | None = None
    """When the final update was accepted (monotonic)."""

    def told(self) -> None:
        if self.status == "canceling" and self.told_canceling_at is None:
            self.told_canceling_at = time.monotonic()

    @property
    def id(self) -> int:
        return int(self.payload["id"])

    @property
    def token(self) -> str:
        return str(self.payload["token"])


def variable(key: str, value: str, *, masked: bool = False, file: bool = False,
             public: bool = True, raw: bool = False) -> Json:
    return {"key": key, "value": value, "public": public and not masked, "masked": masked,
            "file": file, "raw": raw}


def make_job(
    job_id: int,
    *,
    server_url: str = "http://127.0.0.1:1",
    repo_url: str | None = None,
    project_path: str = "group/project",
    sha: str = "0" * 40,
    ref: str = "main",
    script: list[str] | None = None,
    after_script: list[str] | None = None,
    steps: list[Json] | None = None,
    variables: list[Json] | None = None,
    artifacts: list[Json] | None = None,
    cache: list[Json] | None = None,
    dependencies: list[Json] | None = None,
    hooks: list[Json] | None = None,
    timeout: int = 3600,
    image: Json | None = None,
    services: list[Json] | None = None,
    allow_git_fetch: bool = True,
    depth: int = 20,
    refspecs: list[str] | None = None,
    token_mask_prefixes: list[str] | None = None,
    project_id: int = 42,
) -> Json:
    """A job payload shaped as GitLab 17 sends it (``JobResponse`` in network.go)."""
    token = f"glcbt-64_{secrets.token_hex(10)}"
    host = server_url.split("://", 1)[1]
    scheme = server_url.split("://", 1)[0]
    clean_repo = f"{server_url}/{project_path}.git"
    repo = repo_url or f"{scheme}://gitlab-ci-token:{token}@{host}/{project_path}.git"
    pipeline_id = 9000 + job_id
    ci_vars = [
        variable("CI_PIPELINE_ID", str(pipeline_id)),
        variable("CI_PIPELINE_URL", f"{server_url}/{project_path}/-/pipelines/{pipeline_id}"),
        variable("CI_JOB_ID", str(job_id)),
        variable("CI_JOB_URL", f"{server_url}/{project_path}/-/jobs/{job_id}"),
        variable("CI_JOB_TOKEN", token, masked=True),
        variable("CI_JOB_NAME", "test"),
        variable("CI_JOB_STAGE", "test"),
        variable("CI_BUILD_TOKEN", token, masked=True),
        variable("CI_REGISTRY_PASSWORD", token, masked=True),
        variable("CI_REPOSITORY_URL", repo, public=False),
        variable("CI_COMMIT_SHA", sha),
        variable("CI_COMMIT_SHORT_SHA", sha[:8]),
        variable("CI_COMMIT_REF_NAME", ref),
        variable("CI_COMMIT_BRANCH", ref),
        variable("CI_PROJECT_ID", str(project_id)),
        variable("CI_PROJECT_NAME", project_path.rsplit("/", 1)[-1]),
        variable("CI_PROJECT_PATH", project_path),
        variable("CI_PROJECT_NAMESPACE", project_path.rsplit("/", 1)[0]),
        variable("CI_PROJECT_URL", f"{server_url}/{project_path}"),
        variable("CI_SERVER_URL", server_url),
        variable("CI_SERVER_HOST", host.split(":")[0]),
        variable("CI_API_V4_URL", f"{server_url}/api/v4"),
        variable("CI_DEFAULT_BRANCH", "main"),
        variable("GITLAB_CI", "true"),
        variable("CI", "true"),
        variable("CI_SERVER", "yes"),
        variable("CI_JOB_TIMEOUT", str(timeout)),
    ]
    if steps is None:
        steps = [{"name": "script", "script": script or ["echo hello"], "timeout": timeout,
                  "when": "on_success", "allow_failure": False}]
        if after_script:
            # GitLab gives after_script the job's timeout too (the runner applies its own).
            steps.append({"name": "after_script", "script": after_script, "timeout": timeout,
                          "when": "always", "allow_failure": True})
    return {
        "id": job_id,
        "token": token,
        "allow_git_fetch": allow_git_fetch,
        "job_info": {"id": job_id, "name": "test", "stage": "test", "project_id": project_id,
                     "project_name": project_path.rsplit("/", 1)[-1],
                     "time_in_queue_seconds": 0.5,
                     "project_jobs_running_on_instance_runners_count": "0"},
        "git_info": {
            "repo_url": repo, "repo_object_format": "sha1", "ref": ref, "sha": sha,
            "before_sha": "0" * 40, "ref_type": "branch",
            "refspecs": refspecs if refspecs is not None else [
                f"+refs/pipelines/{pipeline_id}:refs/pipelines/{pipeline_id}",
                f"+refs/heads/{ref}:refs/remotes/origin/{ref}",
            ],
            "depth": depth,
        },
        "runner_info": {"timeout": timeout, "runner_session_url": None},
        "variables": ci_vars + (variables or []),
        "steps": steps,
        "image": image,
        "services": services or [],
        "artifacts": artifacts,
        "cache": cache or [],
        "credentials": [{"type": "registry", "url": "registry.example.com",
                         "username": "gitlab-ci-token", "password": token}],
        "dependencies": dependencies or [],
        "features": {"trace_sections": True, "token_mask_prefixes": token_mask_prefixes or [],
                     "failure_reasons": list(FAILURE_REASONS)},
        "hooks": hooks or [],
        "secrets": {},
        "_clean_repo_url": clean_repo,  # not GitLab's; unknown keys must be ignored
    }


class FakeGitLab:
    """State and behaviour of GitLab's runner endpoints; see ``violations`` and ``requests``."""

    def __init__(
        self,
        *,
        long_poll_s: float = 0.0,
        update_interval: int = 1,
        runner_tokens: set[str] | None = None,
        access_token: str = "glpat-access-token-1234",
    ) -> None:
        self.long_poll_s = long_poll_s
        self.update_interval = update_interval
        self.runner_tokens = runner_tokens if runner_tokens is not None else {"glrt-fake-runner"}
        self.access_token = access_token
        self.violations: list[str] = []
        self.requests: list[Recorded] = []
        self.queue: list[FakeJob] = []
        self.jobs: dict[int, FakeJob] = {}
        self.faults: dict[str, list[int]] = defaultdict(list)
        self.accepted_after: int = 0
        """``PUT /jobs/:id`` with a final state answers 202 this many times before 200."""
        self.registered: dict[int, Json] = {}
        self.groups: dict[str, int] = {"acme/platform": 12}
        self.projects: dict[str, int] = {"acme/platform/app": 34}
        self.queue_value = 1
        self.upload_chunk_delay_s = 0.0
        """Read upload bodies 64 KiB at a time with this pause between (a slow GitLab)."""
        self.download_chunk_delay_s = 0.0
        """Send artifact downloads 64 KiB at a time with this pause between."""
        self._changed = asyncio.Condition()
        self._stopping = asyncio.Event()
        self._pending_accepts: dict[int, int] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 2**20, middlewares=[self._record])
        r = app.router
        r.add_post("/api/v4/runners/verify", self._verify)
        r.add_post("/api/v4/jobs/request", self._request_job)
        r.add_patch("/api/v4/jobs/{id}/trace", self._patch_trace)
        r.add_put("/api/v4/jobs/{id}", self._update_job)
        r.add_post("/api/v4/jobs/{id}/artifacts", self._upload)
        r.add_get("/api/v4/jobs/{id}/artifacts", self._download)
        r.add_post("/api/v4/user/runners", self._create_runner)
        r.add_delete("/api/v4/runners", self._delete_runner)
        r.add_get("/api/v4/groups/{path}", self._namespace)
        r.add_get("/api/v4/projects/{path}", self._namespace)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self._stopping.set()  # a slow upload handler ends now, not at its next read
        if self._runner is not None:
            await self._runner.cleanup()

    # -- test controls ----------------------------------------------------------

    async def enqueue(self, payload: Json) -> FakeJob:
        job = FakeJob(payload)
        self.jobs[job.id] = job
        async with self._changed:
            self.queue.append(job)
            self.queue_value += 1
            self._changed.notify_all()
        return job

    def add_finished_job(self, payload: Json, artifact: bytes) -> FakeJob:
        """A job that already ran and left an artifacts archive (a dependency)."""
        job = FakeJob(payload, status="success", stored_artifact=artifact)
        self.jobs[job.id] = job
        return job

    def cancel(self, job_id: int) -> None:
        self.jobs[job_id].status = "canceling"

    def lose_trace(self, job_id: int, keep: int) -> None:
        """Forget trace bytes past ``keep`` (as a lost chunk would): forces a 416 resync."""
        del self.jobs[job_id].trace[keep:]

    def fail_next(self, endpoint: str, *statuses: int) -> None:
        """Answer the next requests to ``endpoint`` (request/trace/update/upload) so."""
        self.faults[endpoint].extend(statuses)

    def count(self, method: str, path_suffix: str) -> int:
        return sum(1 for r in self.requests if r.method == method and r.path.endswith(path_suffix))

    # -- plumbing ---------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # A multipart body is read by its handler (the stream can be read once).
        multipart = request.content_type.startswith("multipart/")
        body = b"" if multipart else await request.read()
        try:
            resp: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            resp = exc
        self.requests.append(Recorded(request.method, request.path, resp.status, time.monotonic(),
                                      dict(request.headers), body))
        return resp

    def _violation(self, message: str) -> web.Response:
        self.violations.append(message)
        return web.json_response({"message": f"400 Bad request - {message}"}, status=400)

    def _fault(self, endpoint: str) -> web.Response | None:
        if self.faults[endpoint]:
            status = self.faults[endpoint].pop(0)
            return web.json_response({"message": f"{status} injected"}, status=status)
        return None

    async def _json(self, request: web.Request) -> Json | None:
        if request.content_type != "application/json":
            return None
        try:
            data = json.loads(await request.read())
        except json.JSONDecodeError:
            return None
        return data if isinstance(data, dict) else None

    def _job_for(self, request: web.Request, token: str | None) -> FakeJob | web.Response:
        job = self.jobs.get(int(request.match_info["id"]))
        if job is None:
            return web.json_response({"message": "404 Not found"}, status=404)
        if token != job.token:
            return web.json_response({"message": "403 Forbidden"}, status=403)
        return job

    # -- runner endpoints ---------------------------------------------------

    async def _verify(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        if body is None or not isinstance(body.get("token"), str):
            return self._violation("runners/verify: token missing")
        if body["token"] not in self.runner_tokens:
            return web.json_response({"message": "403 Forbidden"}, status=403)
        return web.json_response({"id": 77, "token": body["token"], "token_expires_at": None})

    async def _request_job(self, request: web.Request) -> web.Response:
        if (fault := self._fault("request")) is not None:
            return fault
        raw = await self._json(request)
        if raw is None:
            return self._violation("jobs/request: body is not a JSON object")
        try:
            body = JobRequestBody.model_validate(raw)
        except ValidationError as exc:
            return self._violation(f"jobs/request: {exc.errors()[0]}")
        unknown = set(body.info.features) - KNOWN_FEATURES
        if unknown:
            return self._violation(f"jobs/request: unknown features {sorted(unknown)}")
        header = request.headers.get("X-GitLab-Last-Update")
        if header is not None and header != body.last_update:
            return self._violation("jobs/request: X-GitLab-Last-Update differs from last_update")
        if body.token not in self.runner_tokens:
            return web.json_response({"message": "403 Forbidden"}, status=403)
        if not self.queue and body.last_update == str(self.queue_value) and self.long_poll_s:
            # Workhorse's long poll: hold the request until the queue changes.
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: bool(self.queue)), self.long_poll_s
                    )
        headers = {"X-GitLab-Last-Update": str(self.queue_value)}
        if not self.queue:
            return web.Response(status=204, headers=headers)
        job = self.queue.pop(0)
        job.status = "running"
        return web.json_response(job.payload, status=201, headers=headers)

    async def _patch_trace(self, request: web.Request) -> web.Response:
        if (fault := self._fault("trace")) is not None:
            return fault
        job = self._job_for(request, request.headers.get("JOB-TOKEN"))
        if isinstance(job, web.Response):
            return job
        match = _RANGE.match(request.headers.get("Content-Range", ""))
        if match is None:
            return self._violation("trace: Content-Range missing or not 'start-end'")
        data = await request.read()
        start, end = int(match.group(1)), int(match.group(2))
        if not data or end != start + len(data) - 1:
            return self._violation(f"trace: Content-Range {start}-{end} for {len(data)} bytes")
        state = {"Job-Status": job.status, "X-GitLab-Trace-Update-Interval":
                 str(self.update_interval)}
        job.told()
        if job.status not in ("running", "canceling"):
            return web.Response(status=403, headers=state)
        if start != len(job.trace):
            return web.Response(status=416, headers={**state, "Range": f"0-{len(job.trace)}"})
        job.trace += data
        return web.Response(status=202, headers={**state, "Range": f"0-{len(job.trace)}"})

    async def _update_job(self, request: web.Request) -> web.Response:
        if (fault := self._fault("update")) is not None:
            return fault
        raw = await self._json(request)
        if raw is None:
            return self._violation("PUT job: body is not a JSON object")
        try:
            body = UpdateJobBody.model_validate(raw)
        except ValidationError as exc:
            return self._violation(f"PUT job: {exc.errors()[0]}")
        job = self._job_for(request, body.token)
        if isinstance(job, web.Response):
            return job
        if body.failure_reason and body.failure_reason not in FAILURE_REASONS:
            return self._violation(f"PUT job: unknown failure_reason {body.failure_reason}")
        if not re.fullmatch(r"crc32:[0-9a-f]{8}", body.output.checksum):
            return self._violation(f"PUT job: checksum {body.output.checksum!r}")
        state = {"Job-Status": job.status,
                 "X-GitLab-Trace-Update-Interval": str(self.update_interval)}
        if job.status in ("success", "failed", "canceled"):
            return web.Response(status=403, headers=state)
        job.updates.append(raw)
        job.told()
        if body.state == "running":
            return web.Response(status=200, text="200", headers=state)
        expected = f"crc32:{zlib.crc32(bytes(job.trace)):08x}"
        if body.output.checksum != expected or body.output.bytesize != len(job.trace):
            return web.Response(status=412, text="412", headers=state)
        left = self._pending_accepts.setdefault(job.id, self.accepted_after)
        if left > 0:
            self._pending_accepts[job.id] = left - 1
            return web.Response(status=202, text="202", headers=state)
        job.status = "canceled" if job.status == "canceling" else body.state
        job.ended_at = time.monotonic()
        return web.Response(status=200, text="200", headers={**state, "Job-Status": job.status})

    async def _upload(self, request: web.Request) -> web.Response:
        if (fault := self._fault("upload")) is not None:
            return fault
        job = self._job_for(request, request.headers.get("JOB-TOKEN"))
        if isinstance(job, web.Response):
            return job
        if not request.content_type.startswith("multipart/form-data"):
            return self._violation("artifacts: not multipart/form-data")
        query = dict(request.query)
        kind, fmt = query.get("artifact_type"), query.get("artifact_format")
        if kind not in ARTIFACT_FORMATS or fmt != ARTIFACT_FORMATS[kind]:
            return self._violation(f"artifacts: artifact_type {kind!r} with format {fmt!r}")
        reader = await request.multipart()
        part = await reader.next()
        if part is None or getattr(part, "name", None) != "file":
            return self._violation("artifacts: first part is not 'file'")
        filename = getattr(part, "filename", None) or ""
        body = bytearray()
        while chunk := await part.read_chunk(64 * 1024):  # type: ignore[union-attr]
            body += chunk
            if self.upload_chunk_delay_s:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.upload_chunk_delay_s)
            if self._stopping.is_set():
                return web.json_response({"message": "503 stopping"}, status=503)
        data = bytes(body)
        if fmt == "zip" and not zipfile.is_zipfile(io.BytesIO(data)):
            return self._violation("artifacts: 'file' is not a zip archive")
        if fmt == "gzip":
            try:
                gzip_members(data)
            except ValueError as exc:
                return self._violation(f"artifacts: 'file' is not gzip: {exc}")
        job.artifacts.append((query, filename, data))
        if kind == "archive":
            job.stored_artifact = data  # what later jobs download as a dependency
        return web.json_response({"message": "201 Created"}, status=201)

    async def _download(self, request: web.Request) -> web.StreamResponse:
        job = self._job_for(request, request.headers.get("JOB-TOKEN"))
        if isinstance(job, web.Response):
            return job
        if job.stored_artifact is None:
            return web.json_response({"message": "404 Not found"}, status=404)
        if not self.download_chunk_delay_s:
            return web.Response(body=job.stored_artifact, content_type="application/zip")
        resp = web.StreamResponse(headers={"Content-Type": "application/zip"})
        resp.content_length = len(job.stored_artifact)
        await resp.prepare(request)
        for start in range(0, len(job.stored_artifact), 64 * 1024):
            await resp.write(job.stored_artifact[start:start + 64 * 1024])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.download_chunk_delay_s)
            if self._stopping.is_set():
                break
        return resp

    # -- python-gitlab (registration) -------------------------------------

    async def _create_runner(self, request: web.Request) -> web.Response:
        if request.headers.get("PRIVATE-TOKEN") != self.access_token:
            return web.json_response({"message": "401 Unauthorized"}, status=401)
        body = await self._json(request)
        if body is None:
            return self._violation("user/runners: body is not a JSON object")
        kind = body.get("runner_type")
        need = {"group_type": "group_id", "project_type": "project_id"}.get(str(kind))
        if kind not in ("instance_type", "group_type", "project_type"):
            return self._violation(f"user/runners: runner_type {kind!r}")
        if need and not isinstance(body.get(need), int):
            return self._violation(f"user/runners: {need} missing for {kind}")
        tags = body.get("tag_list")
        if tags is not None and not isinstance(tags, list | str):
            return self._violation("user/runners: tag_list")
        runner_id = 100 + len(self.registered)
        token = f"glrt-{secrets.token_urlsafe(15)}"
        self.registered[runner_id] = {**body, "token": token}
        self.runner_tokens.add(token)
        return web.json_response(
            {"id": runner_id, "token": token, "token_expires_at": None}, status=201
        )

    async def _namespace(self, request: web.Request) -> web.Response:
        if request.headers.get("PRIVATE-TOKEN") != self.access_token:
            return web.json_response({"message": "401 Unauthorized"}, status=401)
        path = request.match_info["path"]
        known = self.groups if "/groups/" in request.path else self.projects
        if path not in known:
            return web.json_response({"message": "404 Not found"}, status=404)
        return web.json_response({"id": known[path], "full_path": path})

    async def _delete_runner(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        token = (body or {}).get("token") or request.query.get("token")
        if not isinstance(token, str) or token not in self.runner_tokens:
            return web.json_response({"message": "403 Forbidden"}, status=403)
        self.runner_tokens.discard(token)
        for rid, reg in list(self.registered.items()):
            if reg["token"] == token:
                del self.registered[rid]
        return web.Response(status=204)


@contextlib.asynccontextmanager
async def running_fake(**kw: Any) -> AsyncIterator[FakeGitLab]:
    """A started `FakeGitLab` (``kw`` as its constructor takes them), stopped after; a
    request outside GitLab's shapes fails the test."""
    fake = FakeGitLab(**kw)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
    assert fake.violations == [], "requests outside GitLab's runner API shapes"
