"""A fake of GitHub's runner scale-set service, served by the fake GitHub's own server.

Shapes follow ``actions/scaleset`` (``types.go``, ``client.go``,
``session_client.go``) and its test server: the REST API hands out a
registration token; ``POST <api>/actions/runner-registration`` with
``RemoteAuth <token>`` answers the tenant URL and an admin JWT; the tenant
serves runner groups, scale sets, sessions, the message queue, acquire and
JIT configs. Jobs are offered (``JobAvailable``) to every scale set whose
labels cover the job's; the first to acquire wins, the others learn so from
their ``acquirejobs`` answer. Requests of the wrong shape are answered 400
and recorded in ``violations``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

from tests.fake_github import FakeGitHub, Fault

Json = dict[str, Any]
TENANT = "/tenant/123/"
API_VERSION = "6.0-preview"
_KEY = secrets.token_bytes(32)


@dataclass
class FakeJob:
    request_id: int
    job_id: str
    repo: str
    labels: list[str]
    state: str = "available"  # available, acquired, running, completed
    scale_set: int | None = None
    runner: str | None = None
    result: str | None = None


@dataclass
class FakeSession:
    id: str
    owner: str
    scale_set: int
    token: str
    token_expires: float
    last_poll: float
    max_capacity: list[int] = field(default_factory=list)


@dataclass
class Message:
    id: int
    events: list[Json]
    deleted: bool = False


class FakeScaleSetService:
    """State and behaviour of the scale-set service; mounts itself on ``github``."""

    def __init__(self, github: FakeGitHub, *, clock: Callable[[], float] = time.time) -> None:
        self.github = github
        self.clock = clock
        self.violations: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.admin_ttl_s = 3600.0
        self.queue_token_ttl_s = 3600.0
        self.poll_s = 0.5
        """How long a poll waits for a message before answering 202."""
        self.reoffer_s = 0.3
        """Jobs nobody acquired are offered again after this long (GitHub re-broadcasts)."""
        self.session_stale_s: float | None = None
        """A session not polled for this long may be replaced by a new one (else 409)."""
        self.admin_tokens: dict[str, float] = {}
        self.groups: dict[int, str] = {1: "Default"}
        self.scale_sets: dict[int, Json] = {}
        self.sessions: dict[int, FakeSession] = {}  # by scale set id
        self.sessions_deleted: list[str] = []
        self.queues: dict[int, list[Message]] = {}  # by scale set id
        self.jobs: dict[int, FakeJob] = {}
        self.runners: dict[int, Json] = {}
        self.jit_configs: dict[int, str] = {}
        self.registered: dict[str, int] = {}
        """Every runner registered, name to id, in order (ended ones included)."""
        self.acquire_calls: list[tuple[int, list[int], list[int]]] = []
        self.delivered_at: dict[int, float] = {}
        """When each job was first handed to a listener (``time.monotonic()``), by request id."""
        self.rejected: list[str] = []
        """Requests answered 401, as ``"METHOD path"``."""
        self.faults: list[Fault] = []
        self.hold_jit = False
        """While set, each ``generatejitconfig`` waits for a ticket (`release_jit`) before it
        is answered (or failed by an injected fault): GitHub taking its time to register."""
        self.jit_waiting = 0
        """``generatejitconfig`` requests held right now."""
        self.jit_delay_s = 0.0
        """Each ``generatejitconfig`` answer takes this long (GitHub's round trip)."""
        self._jit_tickets = 0
        self._offered_at: dict[tuple[int, int], float] = {}
        self._ids = iter(range(1, 10**9))
        self._changed = asyncio.Condition()
        github.mount(f"{github.prefix}/actions/runner-registration", self._register)
        github.mount(TENANT, self._tenant)

    # -- test controls -------------------------------------------------------------

    def add_job(self, repo: str, labels: list[str]) -> int:
        """A queued job; returns its runner request id."""
        rid = next(self._ids) + 5000
        self.jobs[rid] = FakeJob(rid, str(uuid.uuid4()), repo, labels)
        self._offer()
        return rid

    def take_job(self, runner_name: str) -> int:
        """Play the runner: it takes the oldest job its scale set acquired."""
        runner = next(r for r in self.runners.values() if r["name"] == runner_name)
        job = next(j for j in sorted(self.jobs.values(), key=lambda j: j.request_id)
                   if j.state == "acquired" and j.scale_set == runner["runnerScaleSetId"])
        job.state, job.runner = "running", runner_name
        runner["busy"] = True
        self._send(runner["runnerScaleSetId"], self._event(
            "JobStarted", job, runnerId=runner["id"], runnerName=runner_name))
        return job.request_id

    def finish_job(self, request_id: int, result: str = "succeeded") -> None:
        """The job ended (or was cancelled before a runner took it)."""
        job = self.jobs[request_id]
        job.state, job.result = "completed", result
        extra: Json = {"result": result, "runnerName": job.runner or "", "runnerId": 0}
        if job.runner is not None:
            runner = next(r for r in self.runners.values() if r["name"] == job.runner)
            extra["runnerId"] = runner["id"]
            del self.runners[runner["id"]]  # ephemeral: gone after its one job
        if job.scale_set is not None:
            self._send(job.scale_set, self._event("JobCompleted", job, **extra))

    def expire_queue_tokens(self) -> None:
        for session in self.sessions.values():
            session.token_expires = 0.0

    def revoke_admin_tokens(self) -> None:
        self.admin_tokens.clear()

    def inject(self, method: str, path: str, status: int, *, times: int = 1,
               body: Json | None = None) -> None:
        """Answer the next ``times`` requests matching ``method`` and ``path`` (a regex
        over the path after the tenant root) with ``status``."""
        body = body if body is not None else {"message": f"injected {status}"}
        self.faults.append(Fault(method, path, status, {}, body, times))

    def release_jit(self, n: int = 1) -> None:
        """Let ``n`` held (or future) ``generatejitconfig`` requests through."""
        self._jit_tickets += n
        asyncio.get_running_loop().create_task(self._notify())

    def stop_holding_jit(self) -> None:
        """Answer every ``generatejitconfig`` at once again (held ones too)."""
        self.hold_jit = False
        asyncio.get_running_loop().create_task(self._notify())

    async def _jit_turn(self) -> None:
        self.jit_waiting += 1
        try:
            async with self._changed:
                await self._changed.wait_for(lambda: not self.hold_jit or self._jit_tickets > 0)
                if self.hold_jit:
                    self._jit_tickets -= 1
        finally:
            self.jit_waiting -= 1

    def acquired_by(self) -> dict[int, int | None]:
        return {rid: job.scale_set for rid, job in self.jobs.items()}

    # -- the registration endpoint ----------------------------------------------------

    async def _register(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "RemoteAuth" or self.github.registration_tokens.get(token, 0) <= self.clock():
            return web.json_response({"message": "Bad credentials"}, status=401)
        body = await _json(request)
        if not isinstance(body, dict) or body.get("runner_event") != "register" or not str(
            body.get("url", "")
        ).startswith("http"):
            return self._violation(f"runner-registration body {body!r}")
        exp = self.clock() + self.admin_ttl_s
        admin = jwt.encode({"exp": int(exp), "iat": int(self.clock()), "scp": "scalesets"},
                           _KEY, algorithm="HS256")
        self.admin_tokens[admin] = exp
        base = self.github.url.removesuffix(self.github.prefix)
        return web.json_response({"url": f"{base}{TENANT}", "token": admin}, status=201)

    # -- the tenant ---------------------------------------------------------------------

    async def _tenant(self, request: web.Request) -> web.StreamResponse:
        path = request.path[len(TENANT):]
        self.requests.append((request.method, path))
        if request.query.get("api-version") != API_VERSION:
            return self._violation(f"{request.method} {path}: api-version missing")
        if request.method == "POST" and path.endswith("/generatejitconfig"):
            await self._jit_turn()
            await asyncio.sleep(self.jit_delay_s)
        for fault in self.faults:
            if fault.times > 0 and fault.method == request.method and re.fullmatch(
                fault.path, path
            ):
                fault.times -= 1
                return web.json_response(fault.body, status=fault.status)
        queue = re.fullmatch(r"_apis/runtime/runnerscalesets/(\d+)/messages(?:/(\d+))?", path)
        if queue or re.fullmatch(r"_apis/runtime/runnerscalesets/\d+/acquirejobs", path):
            return await self._queue_call(request, path, queue)
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.admin_tokens.get(bearer, 0.0) <= self.clock():
            self.rejected.append(f"{request.method} {path}")
            return web.json_response({"message": "admin token expired"}, status=401)
        body = await _json(request)
        return self._admin_call(request.method, path, dict(request.query), body)

    def _admin_call(self, method: str, path: str, query: dict[str, str], body: Any
                    ) -> web.StreamResponse:
        if (method, path) == ("GET", "_apis/runtime/runnergroups/"):
            found = [{"id": gid, "name": name, "isDefaultGroup": gid == 1, "size": 0}
                     for gid, name in self.groups.items() if name == query.get("groupName")]
            return web.json_response({"count": len(found), "value": found})
        if path == "_apis/runtime/runnerscalesets":
            if method == "GET":
                found = [s for s in self.scale_sets.values()
                         if s["name"] == query.get("name")
                         and str(s["runnerGroupId"]) == query.get("runnerGroupId")]
                return web.json_response({"count": len(found), "value": found})
            if method == "POST":
                return self._create_scale_set(body)
        match = re.fullmatch(r"_apis/runtime/runnerscalesets/(\d+)(?:/(\w+))?(?:/([\w-]+))?",
                             path)
        if match:
            sid, what, sub = int(match[1]), match[2], match[3]
            if sid not in self.scale_sets:
                return _error(404, "RunnerScaleSetNotFoundException", "no such scale set")
            if what is None:
                return self._scale_set_call(method, sid, body)
            if what == "sessions":
                return self._session_call(method, sid, sub, body)
            if what == "generatejitconfig" and method == "POST":
                return self._jit(sid, body)
        agent = re.fullmatch(r"_apis/distributedtask/pools/0/agents/(\d+)", path)
        if agent and method == "DELETE":
            if self.runners.pop(int(agent[1]), None) is None:
                return _error(404, "AgentNotFoundException", "no such runner")
            return web.Response(status=204)
        return self._violation(f"{method} {path} is not a scale-set route")

    def _create_scale_set(self, body: Any) -> web.StreamResponse:
        if not (isinstance(body, dict) and isinstance(body.get("name"), str)
                and isinstance(body.get("runnerGroupId"), int)
                and all(isinstance(label, dict) and set(label) == {"name", "type"}
                        for label in body.get("labels", []))):
            return self._violation(f"scale set body {body!r}")
        if any(s["name"] == body["name"] and s["runnerGroupId"] == body["runnerGroupId"]
               for s in self.scale_sets.values()):
            return _error(409, "RunnerScaleSetExistsException", "name taken")
        sid = next(self._ids)
        self.scale_sets[sid] = {
            "id": sid, "name": body["name"], "runnerGroupId": body["runnerGroupId"],
            "runnerGroupName": self.groups.get(body["runnerGroupId"], ""),
            "labels": body.get("labels", []), "RunnerSetting": body.get("RunnerSetting", {}),
            "createdOn": "2024-05-01T12:00:00Z",
            "runnerJitConfigUrl": f"{TENANT}_apis/runtime/runnerscalesets/{sid}/generatejitconfig",
        }
        self.queues[sid] = []
        return web.json_response(self._scale_set_json(sid))

    def _scale_set_call(self, method: str, sid: int, body: Any) -> web.StreamResponse:
        if method == "GET":
            return web.json_response(self._scale_set_json(sid))
        if method == "PATCH" and isinstance(body, dict):
            self.scale_sets[sid]["labels"] = body.get("labels", self.scale_sets[sid]["labels"])
            return web.json_response(self._scale_set_json(sid))
        if method == "DELETE":
            del self.scale_sets[sid]
            return web.Response(status=204)
        return self._violation(f"{method} scale set {sid}")

    def _session_call(self, method: str, sid: int, session_id: str | None, body: Any
                      ) -> web.StreamResponse:
        current = self.sessions.get(sid)
        if method == "POST" and session_id is None:
            if not isinstance(body, dict) or not isinstance(body.get("ownerName"), str):
                return self._violation(f"session body {body!r}")
            stale = (current is not None and self.session_stale_s is not None
                     and self.clock() - current.last_poll > self.session_stale_s)
            if current is not None and not stale:
                return _error(409, "TaskAgentSessionConflictException",
                              f"a session for scale set {sid} exists (owner {current.owner})")
            session = FakeSession(str(uuid.uuid4()), body["ownerName"], sid,
                                  secrets.token_hex(16),
                                  self.clock() + self.queue_token_ttl_s, self.clock())
            self.sessions[sid] = session
            self._offer()
            return web.json_response(self._session_json(session))
        if current is None or current.id != session_id:
            return _error(404, "TaskAgentSessionNotFoundException", "no such session")
        if method == "PATCH":
            current.token = secrets.token_hex(16)
            current.token_expires = self.clock() + self.queue_token_ttl_s
            return web.json_response(self._session_json(current))
        if method == "DELETE":
            del self.sessions[sid]
            self.sessions_deleted.append(current.id)
            return web.Response(status=204)
        return self._violation(f"{method} session")

    def _jit(self, sid: int, body: Any) -> web.StreamResponse:
        if not (isinstance(body, dict) and isinstance(body.get("name"), str)):
            return self._violation(f"generatejitconfig body {body!r}")
        if any(r["name"] == body["name"] for r in self.runners.values()):
            return _error(409, "AgentExistsException", "a runner of that name exists")
        rid = next(self._ids) + 90000
        self.runners[rid] = {"id": rid, "name": body["name"], "runnerScaleSetId": sid,
                             "busy": False}
        self.registered[body["name"]] = rid
        blob = {"runner_id": rid, "secret": secrets.token_hex(16), "work": body.get("workFolder")}
        config = base64.b64encode(json.dumps(blob).encode()).decode()
        self.jit_configs[rid] = config
        runner = {"id": rid, "name": body["name"], "runnerScaleSetId": sid}
        return web.json_response({"runner": runner, "encodedJITConfig": config})

    # -- the queue: session token, long poll, acknowledge, acquire ----------------------

    async def _queue_call(self, request: web.Request, path: str,
                          queue: re.Match[str] | None) -> web.StreamResponse:
        sid = int(path.split("/")[3])
        session = self.sessions.get(sid)
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if session is None or bearer != session.token or session.token_expires <= self.clock():
            self.rejected.append(f"{request.method} {path}")
            return web.Response(status=401, text="The message queue token has expired.")
        if queue is None:  # acquirejobs
            return self._acquire(session, await _json(request))
        if request.query.get("sessionId") != session.id:
            return self._violation(f"{path}: sessionId {request.query.get('sessionId')!r}")
        if request.method == "DELETE" and queue[2]:
            for message in self.queues[sid]:
                if message.id == int(queue[2]):
                    message.deleted = True
            return web.Response(status=204)
        if request.method != "GET":
            return self._violation(f"{request.method} {path}")
        capacity = request.headers.get("X-ScaleSetMaxCapacity", "")
        if not capacity.isdigit():
            return self._violation(f"poll without X-ScaleSetMaxCapacity ({capacity!r})")
        session.max_capacity.append(int(capacity))
        last = int(request.query.get("lastMessageId", "0"))
        deadline = time.monotonic() + self.poll_s
        async with self._changed:
            while True:
                session.last_poll = self.clock()
                pending = [m for m in self.queues[sid] if m.id > last and not m.deleted]
                if pending:
                    for event in pending[0].events:
                        if event["messageType"] == "JobAvailable":
                            self.delivered_at.setdefault(event["runnerRequestId"],
                                                         time.monotonic())
                    return web.json_response(self._message_json(sid, pending[0]))
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.sessions.get(sid) is not session:
                    self._offer(reoffer=True)
                    return web.Response(status=202)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    def _acquire(self, session: FakeSession, body: Any) -> web.StreamResponse:
        if not isinstance(body, list) or not all(isinstance(i, int) for i in body):
            return self._violation(f"acquirejobs body {body!r}")
        won = []
        for rid in body:
            job = self.jobs.get(rid)
            if job is not None and job.state == "available" and self._fits(session.scale_set,
                                                                            job):
                job.state, job.scale_set = "acquired", session.scale_set
                won.append(rid)
                self._send(session.scale_set, self._event("JobAssigned", job))
        self.acquire_calls.append((session.scale_set, list(body), won))
        return web.json_response({"count": len(won), "value": won})

    def _fits(self, sid: int, job: FakeJob) -> bool:
        labels = {label["name"].lower() for label in self.scale_sets[sid]["labels"]}
        return {label.lower() for label in job.labels} <= labels

    def _offer(self, *, reoffer: bool = False) -> None:
        now = time.monotonic()
        for sid in self.sessions:
            events = []
            for job in self.jobs.values():
                if job.state != "available" or not self._fits(sid, job):
                    continue
                offered = self._offered_at.get((sid, job.request_id))
                if offered is None or (reoffer and now - offered >= self.reoffer_s):
                    self._offered_at[(sid, job.request_id)] = now
                    events.append(self._event("JobAvailable", job, acquireJobUrl=(
                        f"{TENANT}_apis/runtime/runnerscalesets/{sid}/acquirejobs")))
            if events:
                self._send(sid, *events)

    def _send(self, sid: int, *events: Json) -> None:
        self.queues.setdefault(sid, []).append(Message(next(self._ids), list(events)))
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- wire shapes ---------------------------------------------------------------------

    def _event(self, kind: str, job: FakeJob, **extra: Any) -> Json:
        owner, _, name = job.repo.partition("/")
        return {
            "messageType": kind, "runnerRequestId": job.request_id, "repositoryName": name,
            "ownerName": owner, "jobId": job.job_id, "jobWorkflowRef": f"{job.repo}/ci.yml@main",
            "jobDisplayName": "build", "workflowRunId": 1, "eventName": "push",
            "requestLabels": job.labels, "queueTime": "2024-05-01T12:00:00Z",
            "scaleSetAssignTime": "0001-01-01T00:00:00Z",
            "runnerAssignTime": "0001-01-01T00:00:00Z", "finishTime": "0001-01-01T00:00:00Z",
            **extra,
        }

    def statistics(self, sid: int) -> Json:
        mine = [j for j in self.jobs.values() if j.scale_set == sid]
        runners = [r for r in self.runners.values() if r["runnerScaleSetId"] == sid]
        busy = sum(1 for r in runners if r["busy"])
        return {
            "totalAvailableJobs": sum(1 for j in self.jobs.values()
                                      if j.state == "available" and self._fits(sid, j)),
            "totalAcquiredJobs": sum(1 for j in mine if j.state == "acquired"),
            "totalAssignedJobs": sum(1 for j in mine if j.state in ("acquired", "running")),
            "totalRunningJobs": sum(1 for j in mine if j.state == "running"),
            "totalRegisteredRunners": len(runners), "totalBusyRunners": busy,
            "totalIdleRunners": len(runners) - busy,
        }

    def _scale_set_json(self, sid: int) -> Json:
        return {**self.scale_sets[sid], "statistics": self.statistics(sid)}

    def _session_json(self, session: FakeSession) -> Json:
        base = self.github.url.removesuffix(self.github.prefix)
        sid = session.scale_set
        return {
            "sessionId": session.id, "ownerName": session.owner,
            "runnerScaleSet": {"id": sid, "name": self.scale_sets[sid]["name"]},
            "messageQueueUrl": (f"{base}{TENANT}_apis/runtime/runnerscalesets/{sid}/messages"
                                f"?sessionId={session.id}"),
            "messageQueueAccessToken": session.token, "statistics": self.statistics(sid),
        }

    def _message_json(self, sid: int, message: Message) -> Json:
        return {"messageId": message.id, "messageType": "RunnerScaleSetJobMessages",
                "body": json.dumps(message.events), "statistics": self.statistics(sid)}

    def _violation(self, text: str) -> web.StreamResponse:
        self.violations.append(text)
        return web.json_response({"message": f"fake violation: {text}"}, status=400)


def _error(status: int, kind: str, message: str) -> web.StreamResponse:
    """The service's exception body (as ``ParseActionsErrorFromResponse`` reads it)."""
    return web.json_response({
        "$id": "1", "innerException": None, "message": message,
        "typeName": f"GitHub.DistributedTask.WebApi.{kind}, GitHub.DistributedTask.WebApi",
        "typeKey": kind, "errorCode": 0, "eventId": 3000,
    }, status=status)


async def _json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return {"__not_json__": True}
