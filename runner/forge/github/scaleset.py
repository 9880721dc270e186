"""GitHub's runner scale-set protocol without I/O: its values, their parsing, and intake.

A scale set is a named group of ephemeral runners that GitHub hands work to
through a message queue. The listener opens a *session* on its scale set,
long-polls *messages* (each a batch of job events plus the scale set's
statistics), *acquires* the jobs it can take, acknowledges each message by
deleting it, and registers one just-in-time runner per job it was assigned.
Facts from GitHub's own Go client (``actions/scaleset``: ``types.go``,
``session_client.go``, ``listener/listener.go``) and ARC's listener.

``Intake`` is the listener's memory and its decisions: which offered jobs to
acquire within this host's free capacity, and how many runners to start.
It only ever sees parsed values; the loop in ``scaleset_listener`` does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import urlsplit

import jwt

from runner.errors import ForgeError
from runner.forge.github.types import FORGE, Scope
from runner.secret import Secret

T = TypeVar("T")

API_VERSION = "6.0-preview"
SCALE_SETS = "_apis/runtime/runnerscalesets"
RUNNER_GROUPS = "_apis/runtime/runnergroups/"
AGENTS = "_apis/distributedtask/pools/0/agents"
MAX_CAPACITY_HEADER = "X-ScaleSetMaxCapacity"
JOB_MESSAGES = "RunnerScaleSetJobMessages"


class MessageType(StrEnum):
    """Kinds of job event inside a message batch."""

    AVAILABLE = "JobAvailable"
    """A queued job this scale set may acquire (any scale set with matching labels may)."""
    ASSIGNED = "JobAssigned"
    """The job is this scale set's: one of its runners will take it."""
    STARTED = "JobStarted"
    COMPLETED = "JobCompleted"


@dataclass(frozen=True)
class Statistics:
    """The scale set's counters as GitHub reports them with each message."""

    available: int = 0
    acquired: int = 0
    assigned: int = 0
    running: int = 0
    registered: int = 0
    busy: int = 0
    idle: int = 0

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Statistics:
        """Parse ``RunnerScaleSetStatistic``; a missing block reads as all zero."""
        if not data:
            return cls()
        return cls(*(_int(data.get(key, 0)) for key in _STAT_KEYS))

    def to_json(self) -> dict[str, int]:
        """The wire form (for fakes and logs)."""
        return dict(zip(_STAT_KEYS, (self.available, self.acquired, self.assigned,
                                     self.running, self.registered, self.busy, self.idle),
                        strict=True))


_STAT_KEYS = ("totalAvailableJobs", "totalAcquiredJobs", "totalAssignedJobs", "totalRunningJobs",
              "totalRegisteredRunners", "totalBusyRunners", "totalIdleRunners")


@dataclass(frozen=True)
class JobMessage:
    """One job event of a batch; ``request_id`` (the runner request) is the key."""

    kind: MessageType
    request_id: int
    job_id: str
    repo: str
    """``owner/repo``."""
    labels: tuple[str, ...] = ()
    runner_name: str | None = None
    result: str | None = None


@dataclass(frozen=True)
class Batch:
    """A message from the session's queue: job events and fresh statistics."""

    message_id: int
    statistics: Statistics
    jobs: tuple[JobMessage, ...] = ()


@dataclass(frozen=True)
class ScaleSet:
    """A runner scale set: where its runners register and which labels route jobs to it."""

    id: int
    name: str
    runner_group_id: int
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Session:
    """An open message session; the queue token authorises polling, deleting, acquiring."""

    id: str
    owner: str
    scale_set_id: int
    queue_url: str
    queue_token: Secret
    statistics: Statistics


@dataclass(frozen=True)
class AdminConnection:
    """The Actions service's URL and the admin token for it, with the token's expiry."""

    url: str
    token: Secret
    expires_at: float


# -- parsing: wire dicts in, values out ---------------------------------------------


def config_url(api_url: str, scope: Scope) -> str:
    """The web URL GitHub's runner registration names a scope by (``https://github.com/org``).

    ``api.github.com`` maps to ``github.com``; an Enterprise Server's
    ``https://HOST/api/v3`` to ``https://HOST``; anything else is used as is.
    """
    parts = urlsplit(api_url.rstrip("/"))
    host, path = parts.netloc, parts.path
    if host == "api.github.com":
        host = "github.com"
    path = path.removesuffix("/api/v3")
    return f"{parts.scheme}://{host}{path}/{scope}"


def admin_token_expiry(token: str) -> float:
    """The ``exp`` of the admin token (a JWT; GitHub signed it, we only read it)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
        return float(claims["exp"])
    except (jwt.PyJWTError, KeyError, TypeError, ValueError) as exc:
        raise ForgeError("the Actions admin token is not a JWT with exp", forge=FORGE) from exc


def parse_admin(data: Any) -> AdminConnection:
    """``POST /actions/runner-registration`` → the service URL and admin token."""

    def parse(d: Any) -> AdminConnection:
        token = _str(d["token"])
        return AdminConnection(_str(d["url"]), Secret(token), admin_token_expiry(token))

    return shape(parse, data, "runner-registration")


def parse_scale_set(data: Any) -> ScaleSet:
    """One ``RunnerScaleSet``."""

    def parse(d: Any) -> ScaleSet:
        labels = tuple(_str(label["name"]) for label in d.get("labels") or [])
        return ScaleSet(_int(d["id"]), _str(d["name"]), _int(d["runnerGroupId"]), labels)

    return shape(parse, data, "runner scale set")


def scale_set_body(name: str, runner_group_id: int, labels: Iterable[str]) -> dict[str, Any]:
    """The body that creates (or updates) a scale set of ephemeral runners."""
    return {
        "name": name,
        "runnerGroupId": runner_group_id,
        "labels": [{"name": label, "type": "System"} for label in labels],
        "RunnerSetting": {"ephemeral": True, "disableUpdate": True},
    }


def parse_session(data: Any) -> Session:
    """A ``RunnerScaleSetSession`` (create or refresh)."""

    def parse(d: Any) -> Session:
        return Session(
            id=_str(d["sessionId"]),
            owner=_str(d.get("ownerName") or ""),
            scale_set_id=_int(d["runnerScaleSet"]["id"]),
            queue_url=_str(d["messageQueueUrl"]),
            queue_token=Secret(_str(d["messageQueueAccessToken"])),
            statistics=Statistics.from_json(d.get("statistics")),
        )

    return shape(parse, data, "message session")


def parse_batch(data: Any) -> Batch:
    """A ``RunnerScaleSetMessage``: its body is a JSON string holding a list of job events.

    Events of kinds we do not know are skipped (GitHub adds kinds); a message
    of another type is an error.
    """

    def parse(d: Any) -> Batch:
        if d["messageType"] != JOB_MESSAGES:
            raise ValueError(f"message type {d['messageType']!r}")
        raw = d.get("body") or "[]"
        events = json.loads(raw) if isinstance(raw, str) else raw
        jobs = tuple(job for job in map(_job_message, events) if job is not None)
        return Batch(_int(d["messageId"]), Statistics.from_json(d.get("statistics")), jobs)

    return shape(parse, data, "runner scale set message")


def _job_message(d: Any) -> JobMessage | None:
    try:
        kind = MessageType(d["messageType"])
    except ValueError:
        return None
    owner, name = d.get("ownerName") or "", d.get("repositoryName") or ""
    return JobMessage(
        kind=kind,
        request_id=_int(d["runnerRequestId"]),
        job_id=str(d.get("jobId") or ""),
        repo=f"{owner}/{name}" if owner and name else name,
        labels=tuple(_str(label) for label in d.get("requestLabels") or []),
        runner_name=d.get("runnerName") or None,
        result=d.get("result") or None,
    )


def parse_acquired(data: Any) -> list[int]:
    """``acquirejobs`` answers ``{"count": n, "value": [request ids won]}``."""
    return shape(lambda d: [_int(v) for v in d.get("value") or []], data, "acquirejobs")


def shape(parse: Callable[[Any], T], data: Any, what: str) -> T:
    """Apply ``parse``; a missing or mistyped field means the service answered nonsense."""
    try:
        return parse(data)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise ForgeError(f"unexpected {what}: {type(exc).__name__} {exc}", forge=FORGE) from exc


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an integer")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


# -- intake: what to acquire, how many runners to start ------------------------------


class RunnerState(StrEnum):
    """One of our JIT runners, from registration until its VM ends."""

    WAITING = "waiting"
    """Being registered or registered, its VM queued, restoring or listening: it has
    taken no job."""
    BUSY = "busy"
    """GitHub said it started a job."""


@dataclass
class Intake:
    """A scale-set listener's memory of jobs and runners, and its decisions (no I/O).

    Demand is the jobs assigned to this scale set that no runner took yet;
    supply is our runners that took no job yet. A runner is not bound to a
    job: any idle runner of the scale set takes any assigned job. So the
    listener starts ``demand - supply`` runners (as far as the host has room)
    and acquires new offers only with the room left after that.
    """

    max_runners: int
    last_message_id: int = 0
    statistics: Statistics = field(default_factory=Statistics)
    offered: dict[int, JobMessage] = field(default_factory=dict)
    assigned: set[int] = field(default_factory=set)
    running: set[int] = field(default_factory=set)
    runners: dict[str, RunnerState] = field(default_factory=dict)
    backlog: int = 0
    """Jobs assigned before this session (a restart): known only as a count."""
    _finished: set[int] = field(default_factory=set)

    def resume(self, statistics: Statistics) -> None:
        """A new session: jobs GitHub already assigned to us still need runners."""
        self.statistics = statistics
        known = len(self.assigned) + len(self.running)
        self.backlog = max(0, statistics.assigned - statistics.running - known)

    def receive(self, batch: Batch) -> bool:
        """Take in a message; ``False`` if it was seen already (redelivered, not acked)."""
        if batch.message_id <= self.last_message_id:
            return False
        self.last_message_id = batch.message_id
        self.statistics = batch.statistics
        for job in batch.jobs:
            self._event(job)
        return True

    def _event(self, job: JobMessage) -> None:
        rid = job.request_id
        if job.kind is MessageType.AVAILABLE:
            if rid not in self.assigned | self.running | self._finished:
                self.offered[rid] = job
        elif job.kind is MessageType.ASSIGNED:
            self.offered.pop(rid, None)
            if rid not in self.running | self._finished:
                self._claim(rid)
        elif job.kind is MessageType.STARTED:
            self.offered.pop(rid, None)
            if rid not in self.assigned and rid not in self.running:
                self.backlog = max(0, self.backlog - 1)
            self.assigned.discard(rid)
            if rid not in self._finished:
                self.running.add(rid)
            if job.runner_name in self.runners:
                self.runners[job.runner_name] = RunnerState.BUSY
        else:  # COMPLETED: ran, or was cancelled before any runner took it
            self.offered.pop(rid, None)
            if rid not in self.assigned and rid not in self.running:
                self.backlog = max(0, self.backlog - 1)
            self.assigned.discard(rid)
            self.running.discard(rid)
            self._finished.add(rid)
            if job.runner_name is not None:
                self.runners.pop(job.runner_name, None)

    def _claim(self, rid: int) -> None:
        if rid not in self.assigned:
            # Not acquired in this session: perhaps one of the backlog, now named. If it
            # was a new job instead, demand is one short only until a runner takes a job
            # (STARTED for an unknown id no longer lowers the backlog below zero).
            self.assigned.add(rid)
            self.backlog = max(0, self.backlog - 1)

    @property
    def demand(self) -> int:
        """Assigned jobs that no runner of ours has taken."""
        return len(self.assigned) + self.backlog

    @property
    def waiting(self) -> int:
        """Our runners that have not taken a job."""
        return sum(1 for s in self.runners.values() if s is RunnerState.WAITING)

    def to_acquire(self, free: int) -> tuple[int, ...]:
        """Offers to acquire with room for ``free`` more jobs on this host.

        Runners for jobs already assigned come first; only the room left after
        them is spent on new offers, and never beyond ``max_runners`` in all.
        """
        room = min(max(0, free) - self.to_start(free),
                   self.max_runners - len(self.runners) - max(0, self.demand - self.waiting))
        return tuple(sorted(self.offered)[: max(0, room)])

    def acquired(self, asked: Iterable[int], won: Iterable[int]) -> None:
        """Record the answer to ``acquirejobs``: offers not won went to another scale set."""
        won = set(won)
        for rid in asked:
            self.offered.pop(rid, None)
            if rid in won and rid not in self.running | self._finished:
                self.assigned.add(rid)

    def to_start(self, free: int) -> int:
        """Runners to start now for assigned jobs, with room for ``free`` more jobs."""
        return min(max(0, self.demand - self.waiting), max(0, free))

    def runner_started(self, name: str) -> None:
        """A JIT runner is starting: its VM queued, its registration asked for."""
        self.runners[name] = RunnerState.WAITING

    def runner_ended(self, name: str) -> bool:
        """Its VM ended; ``True`` if it had taken a job (or GitHub already said it finished)."""
        state = self.runners.pop(name, None)
        return state is not RunnerState.WAITING

    def surplus(self) -> int:
        """Waiting runners beyond the demand (a job was cancelled before one took it)."""
        return max(0, self.waiting - self.demand)
