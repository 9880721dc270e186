"""GitHub webhook deliveries without I/O: signature check, event parsing, dedupe.

Bytes and header values in, typed events out (like gidgethub's ``sansio``).
The HTTP handler around it answers 401 on ``WebhookSignatureError``, 400 on
``WebhookError``, 200 otherwise, and must answer within 10 s.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from runner.errors import ConfigError, WebhookError, WebhookSignatureError
from runner.forge.github.types import FORGE
from runner.limits import load_json

Action = Literal["queued", "in_progress", "completed", "waiting"]
_ACTIONS: frozenset[str] = frozenset({"queued", "in_progress", "completed", "waiting"})
_PREFIX = "sha256="


def verify_signature(secret: bytes, body: bytes, header: str | None) -> None:
    """Check ``X-Hub-Signature-256`` (HMAC-SHA256 of the raw body) in constant time.

    Raises ``WebhookSignatureError`` if the header is missing, malformed or wrong.
    """
    if not secret:
        raise ConfigError("github.webhook_secret", "must not be empty")
    if not header:
        raise WebhookSignatureError("missing X-Hub-Signature-256 header", forge=FORGE)
    if not header.startswith(_PREFIX):
        raise WebhookSignatureError("X-Hub-Signature-256 does not start with sha256=", forge=FORGE)
    try:
        given = bytes.fromhex(header[len(_PREFIX) :])
    except ValueError:
        given = b""
    if len(given) != hashlib.sha256().digest_size:
        raise WebhookSignatureError("X-Hub-Signature-256 is not a SHA-256 hex digest", forge=FORGE)
    expected = hmac.new(secret, body, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, given):
        raise WebhookSignatureError("X-Hub-Signature-256 does not match the body", forge=FORGE)


@dataclass(frozen=True)
class Ping:
    """GitHub's hello after a hook is created."""

    delivery_id: str
    hook_id: int | None
    zen: str | None


@dataclass(frozen=True)
class WorkflowJobEvent:
    """A ``workflow_job`` delivery with the fields Snapfleet acts on."""

    delivery_id: str
    action: Action
    job_id: int
    run_id: int
    repo: str
    """Repository full name, ``owner/repo``."""
    owner: str
    """Organization login, or the repository owner's login for user repositories."""
    labels: tuple[str, ...]
    runner_name: str | None
    runner_id: int | None
    conclusion: str | None
    html_url: str | None
    installation_id: int | None


@dataclass(frozen=True)
class Ignored:
    """A delivery Snapfleet does not act on (another event or action)."""

    delivery_id: str
    event: str
    reason: str


Event = Ping | WorkflowJobEvent | Ignored


def parse_event(event_name: str, delivery_id: str, body: bytes) -> Event:
    """Turn one delivery (``X-GitHub-Event``, ``X-GitHub-Delivery``, raw body) into an event.

    Call ``verify_signature`` first. Raises ``WebhookError`` naming the field
    when a ``ping`` or ``workflow_job`` payload lacks what we need.
    """
    if event_name not in ("ping", "workflow_job"):
        return Ignored(delivery_id, event_name, f"event {event_name!r} is not handled")
    payload = _Fields(_load(body), "")
    if event_name == "ping":
        return Ping(delivery_id, payload.integer_or_none("hook_id"), payload.text_or_none("zen"))
    action = payload.text("action")
    if action not in _ACTIONS:
        return Ignored(delivery_id, event_name, f"action {action!r} is not handled")
    job = payload.obj("workflow_job")
    repository = payload.obj("repository")
    org = payload.obj_or_none("organization")
    owner = org.text("login") if org else repository.obj("owner").text("login")
    installation = payload.obj_or_none("installation")
    return WorkflowJobEvent(
        delivery_id=delivery_id,
        action=action,  # type: ignore[arg-type]  # checked against _ACTIONS above
        job_id=job.integer("id"),
        run_id=job.integer("run_id"),
        repo=repository.text("full_name"),
        owner=owner,
        labels=job.labels("labels"),
        runner_name=job.text_or_none("runner_name"),
        runner_id=job.integer_or_none("runner_id"),
        conclusion=job.text_or_none("conclusion"),
        html_url=job.text_or_none("html_url"),
        installation_id=installation.integer("id") if installation else None,
    )


def _load(body: bytes) -> dict[str, Any]:
    try:
        data = load_json(body)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WebhookError(f"body is not JSON: {exc}", forge=FORGE) from exc
    if not isinstance(data, dict):
        raise WebhookError("body is not a JSON object", forge=FORGE)
    return data


class _Fields:
    """Typed access to one JSON object; errors name the dotted path of the field."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self._data = data
        self._where = where

    def _path(self, key: str) -> str:
        return f"{self._where}.{key}" if self._where else key

    def _fail(self, key: str, what: str) -> WebhookError:
        path = self._path(key)
        return WebhookError(f"payload field {path}: {what}", forge=FORGE, field=path)

    def _get(self, key: str) -> Any:
        if key not in self._data:
            raise self._fail(key, "missing")
        return self._data[key]

    def obj(self, key: str) -> _Fields:
        value = self._get(key)
        if not isinstance(value, dict):
            raise self._fail(key, "expected an object")
        return _Fields(value, self._path(key))

    def obj_or_none(self, key: str) -> _Fields | None:
        return None if self._data.get(key) is None else self.obj(key)

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._fail(key, "expected a string")
        return value

    def text_or_none(self, key: str) -> str | None:
        return None if self._data.get(key) is None else self.text(key)

    def integer(self, key: str) -> int:
        value = self._get(key)
        # The schema types run_id and (on completed) runner_id as "number".
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, "expected an integer")
        return value

    def integer_or_none(self, key: str) -> int | None:
        return None if self._data.get(key) is None else self.integer(key)

    def labels(self, key: str) -> tuple[str, ...]:
        value = self._get(key)
        # One allOf branch of the completed schema allows null items; they route nothing.
        if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
            raise self._fail(key, "expected a list of strings")
        return tuple(v for v in value if v is not None)


class DeliveryDedupe:
    """Remembers recent ``X-GitHub-Delivery`` ids (bounded count and age).

    GitHub does not redeliver on its own, but operators do ("Redeliver" in
    the UI), and proxies retry; acting twice on ``queued`` starts two VMs.
    """

    def __init__(
        self,
        max_entries: int = 10_000,
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError("max_entries must be >= 1 and ttl_s > 0")
        self._max = max_entries
        self._ttl = ttl_s
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def seen(self, delivery_id: str) -> bool:
        """True if this id was seen within the TTL; otherwise remember it and return False."""
        now = self._clock()
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if now - at < self._ttl:
                break
            del self._seen[oldest]
        if delivery_id in self._seen:
            return True
        self._seen[delivery_id] = now
        if len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._seen)
