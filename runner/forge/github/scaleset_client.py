"""The runner scale-set API over aiohttp: admin token, scale sets, sessions, messages, JIT.

Two services take part. GitHub's REST API hands out a registration token for
a scope, which ``POST /actions/runner-registration`` trades for the Actions
service's URL and an *admin token* (a JWT, about an hour). Every scale-set
call goes to that service with the admin token, except the message queue
and ``acquirejobs``, which take the session's *queue token*. Both tokens are
refreshed here: the admin token a minute before its ``exp`` (or at once on a
401), the queue token by refreshing the session when the queue answers 401.

All failures leave as ``runner.errors`` forge errors; no token reaches a message.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from runner import __version__
from runner.errors import ForgeAuthError, ForgeError, ForgeUnavailable
from runner.forge.github import scaleset as proto
from runner.forge.github._http import Clock, RetryPolicy, Sleep
from runner.forge.github.api import GitHubClient
from runner.forge.github.types import FORGE, JitConfig, Scope
from runner.secret import Secret

ADMIN_REFRESH_MARGIN_S = 60.0
"""Fetch a new admin token this long before the current one's ``exp`` (as GitHub's client)."""
POLL_TIMEOUT_S = 90.0
"""The queue holds a poll for about 50 s before answering 202; allow for that."""


class ActionsService:
    """Requests to the Actions service of one scope, with a fresh admin token on each."""

    def __init__(
        self,
        github: GitHubClient,
        scope: Scope,
        *,
        retry: RetryPolicy | None = None,
        timeout_s: float = 30.0,
        refresh_margin_s: float = ADMIN_REFRESH_MARGIN_S,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.github = github
        self.scope = scope
        self.config_url = proto.config_url(github.transport.api_url, scope)
        self._retry = retry or RetryPolicy()
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._margin = refresh_margin_s
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._http: aiohttp.ClientSession | None = None
        self._admin: proto.AdminConnection | None = None
        self._lock = asyncio.Lock()
        self.admin_fetches = 0
        """Admin tokens fetched so far (for metrics and tests)."""

    async def close(self) -> None:
        """Close the HTTP session (the REST client is its owner's to close)."""
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- the admin token ----------------------------------------------------------

    async def admin(self) -> proto.AdminConnection:
        """The service URL and admin token, fetched or refreshed when near expiry."""
        async with self._lock:
            admin = self._admin
            if admin is None or self._clock() >= admin.expires_at - self._margin:
                admin = self._admin = await self._register()
            return admin

    def invalidate(self, stale: proto.AdminConnection) -> None:
        """Forget the admin token (the service answered 401 with it)."""
        if self._admin is stale:
            self._admin = None

    async def _register(self) -> proto.AdminConnection:
        token, _expires = await self.github.registration_token(self.scope)
        resp = await self.github.transport.request(
            "POST",
            "/actions/runner-registration",
            authorization=Secret(f"RemoteAuth {token.reveal()}"),
            body={"url": self.config_url, "runner_event": "register"},
            ok=(200, 201),
        )
        self.admin_fetches += 1
        return proto.parse_admin(resp.data)

    # -- requests ----------------------------------------------------------------------

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        ok: Collection[int] = (200,),
    ) -> tuple[int, Any]:
        """A request to ``<service>/<path>`` with the admin token; a 401 refreshes it once."""
        for first_try in (True, False):
            admin = await self.admin()
            url = f"{admin.url.rstrip('/')}/{path.lstrip('/')}"
            try:
                return await self.send(method, url, admin.token, params=params, body=body, ok=ok)
            except ForgeAuthError as exc:
                if exc.status != 401 or not first_try:
                    raise
                self.invalidate(admin)
        raise AssertionError("unreachable")  # pragma: no cover

    async def send(
        self,
        method: str,
        url: str,
        token: Secret,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        ok: Collection[int] = (200,),
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[int, Any]:
        """One request with ``token``, retrying connection errors, 5xx and 429 within policy.

        Returns the status and decoded JSON body (``None`` when empty). A 401
        raises ``ForgeAuthError`` at once: the caller knows which token to renew.
        """
        query = {"api-version": proto.API_VERSION, **(params or {})}
        what = f"{method} {urlsplit(url).path}"
        waited = 0.0
        for attempt in range(1, self._retry.max_attempts + 1):
            try:
                status, raw = await self._send(method, url, token, query, body, headers, timeout_s)
            except (aiohttp.ClientError, TimeoutError) as exc:
                failure: ForgeError = ForgeUnavailable(
                    f"{what}: {type(exc).__name__}: {exc}", forge=FORGE
                )
                delay: float | None = self._retry.backoff(attempt, self._rng)
            else:
                if status in ok:
                    return status, _decode(raw, what)
                failure, delay = self._classify(status, raw, what, attempt)
            if delay is None or attempt == self._retry.max_attempts:
                raise failure
            if waited + delay > self._retry.max_wait_s:
                raise failure
            await self._sleep(delay)
            waited += delay
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(
        self,
        method: str,
        url: str,
        token: Secret,
        query: Mapping[str, str],
        body: Any,
        headers: Mapping[str, str] | None,
        timeout_s: float | None,
    ) -> tuple[int, bytes]:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        sent = {
            "Accept": "application/json",
            "Content-Type": "application/json",
            "User-Agent": f"snapfleet/{__version__}",
            "Authorization": f"Bearer {token.reveal()}",
            **(headers or {}),
        }
        timeout = self._timeout if timeout_s is None else aiohttp.ClientTimeout(total=timeout_s)
        data = None if body is None else json.dumps(body)
        async with self._http.request(
            method, url, params=query, data=data, headers=sent, timeout=timeout
        ) as resp:
            return resp.status, await resp.read()

    def _classify(
        self, status: int, raw: bytes, what: str, attempt: int
    ) -> tuple[ForgeError, float | None]:
        message = f"{what}: {status} {_exception(raw)}".rstrip()
        if status == 401 or status == 403:
            return ForgeAuthError(message, forge=FORGE, status=status), None
        if status == 429 or status >= 500:
            delay = self._retry.backoff(attempt, self._rng)
            return ForgeUnavailable(message, forge=FORGE, status=status), delay
        return ForgeError(message, forge=FORGE, status=status), None


class ScaleSetClient:
    """The scale-set calls: runner groups, scale sets, JIT runners, runner removal."""

    def __init__(self, service: ActionsService) -> None:
        self.service = service

    async def runner_group_id(self, name: str) -> int:
        """The id of the runner group called ``name`` (``default`` is 1 without asking)."""
        if name.lower() == "default":
            return 1
        _, data = await self.service.call("GET", proto.RUNNER_GROUPS, params={"groupName": name})
        groups = proto.shape(lambda d: list(d.get("value") or []), data, "runner groups")
        if len(groups) != 1:
            found = "no" if not groups else "several"
            raise ForgeError(f"{found} runner group named {name!r}", forge=FORGE)
        return proto.shape(lambda g: int(g["id"]), groups[0], "runner group")

    async def get_scale_set(self, runner_group_id: int, name: str) -> proto.ScaleSet | None:
        """The scale set called ``name`` in the group, if there is one."""
        _, data = await self.service.call(
            "GET", proto.SCALE_SETS, params={"runnerGroupId": str(runner_group_id), "name": name}
        )
        found = proto.shape(lambda d: list(d.get("value") or []), data, "runner scale sets")
        if len(found) > 1:
            raise ForgeError(f"several runner scale sets named {name!r}", forge=FORGE)
        return proto.parse_scale_set(found[0]) if found else None

    async def ensure_scale_set(
        self, name: str, runner_group_id: int, labels: Collection[str]
    ) -> proto.ScaleSet:
        """Get or create the scale set; if its labels differ from ``labels``, update them."""
        body = proto.scale_set_body(name, runner_group_id, labels)
        found = await self.get_scale_set(runner_group_id, name)
        if found is None:
            _, data = await self.service.call("POST", proto.SCALE_SETS, body=body)
            return proto.parse_scale_set(data)
        if set(found.labels) != set(labels):
            _, data = await self.service.call(
                "PATCH", f"{proto.SCALE_SETS}/{found.id}", body=body
            )
            return proto.parse_scale_set(data)
        return found

    async def delete_scale_set(self, scale_set_id: int) -> None:
        """Remove a scale set (one that is already gone is fine)."""
        await self.service.call("DELETE", f"{proto.SCALE_SETS}/{scale_set_id}", ok=(204, 404))

    async def generate_jitconfig(
        self, scale_set_id: int, name: str, *, work_folder: str = "_work"
    ) -> JitConfig:
        """Register a JIT runner in the scale set; a 409 means the name is taken."""
        _, data = await self.service.call(
            "POST",
            f"{proto.SCALE_SETS}/{scale_set_id}/generatejitconfig",
            body={"name": name, "workFolder": work_folder},
        )

        def parse(d: Any) -> JitConfig:
            config = d["encodedJITConfig"]
            if not isinstance(config, str):
                raise TypeError("encodedJITConfig")
            return JitConfig(int(d["runner"]["id"]), str(d["runner"]["name"]), Secret(config))

        return proto.shape(parse, data, "generatejitconfig")

    async def remove_runner(self, runner_id: int) -> None:
        """Remove a runner registration (gone already is fine)."""
        await self.service.call("DELETE", f"{proto.AGENTS}/{runner_id}", ok=(204, 404))


class MessageSession:
    """One message session on a scale set: poll, acknowledge, acquire; refresh on 401.

    Like GitHub's client, a 401 from the queue means the queue token expired:
    refresh the session (PATCH) and try once more; if the service no longer
    knows the session (404), create a new one in its place.
    """

    def __init__(self, service: ActionsService, scale_set_id: int, owner: str) -> None:
        self.service = service
        self.scale_set_id = scale_set_id
        self.owner = owner
        self.session: proto.Session | None = None
        self.refreshes = 0

    @property
    def current(self) -> proto.Session:
        if self.session is None:
            raise ForgeError("no message session is open", forge=FORGE)
        return self.session

    async def create(self) -> proto.Session:
        """Open a session; ``ForgeError`` with status 409 if one is open already."""
        _, data = await self.service.call(
            "POST",
            f"{proto.SCALE_SETS}/{self.scale_set_id}/sessions",
            body={"ownerName": self.owner},
        )
        self.session = proto.parse_session(data)
        return self.session

    async def delete(self, session_id: str | None = None) -> None:
        """Close the session (or the one named ``session_id``); one already gone is fine."""
        sid = session_id or self.current.id
        await self.service.call(
            "DELETE", f"{proto.SCALE_SETS}/{self.scale_set_id}/sessions/{sid}", ok=(204, 404)
        )
        if self.session is not None and self.session.id == sid:
            self.session = None

    async def _refresh(self, stale: proto.Session) -> None:
        if self.session is not stale:
            return  # another caller refreshed it already
        try:
            _, data = await self.service.call(
                "PATCH", f"{proto.SCALE_SETS}/{self.scale_set_id}/sessions/{stale.id}"
            )
        except ForgeError as exc:
            if exc.status != 404:
                raise
            await self.create()  # the service forgot it: a new one keeps our cursor
        else:
            self.session = proto.parse_session(data)
        self.refreshes += 1

    async def get_message(self, last_message_id: int, max_capacity: int) -> proto.Batch | None:
        """Long-poll the queue; ``None`` when it had nothing (202)."""
        params = {"lastMessageId": str(last_message_id)} if last_message_id > 0 else {}
        headers = {proto.MAX_CAPACITY_HEADER: str(max(0, max_capacity))}
        for first_try in (True, False):
            session = self.current
            try:
                status, data = await self.service.send(
                    "GET", session.queue_url, session.queue_token, params=params,
                    ok=(200, 202), headers=headers, timeout_s=POLL_TIMEOUT_S,
                )
            except ForgeAuthError as exc:
                if exc.status != 401 or not first_try:
                    raise
                await self._refresh(session)
                continue
            return None if status == 202 or data is None else proto.parse_batch(data)
        raise AssertionError("unreachable")  # pragma: no cover

    async def delete_message(self, message_id: int) -> None:
        """Acknowledge a message: the queue stops handing it out."""
        for first_try in (True, False):
            session = self.current
            base, _, query = session.queue_url.partition("?")
            url = f"{base.rstrip('/')}/{message_id}" + (f"?{query}" if query else "")
            try:
                await self.service.send("DELETE", url, session.queue_token, ok=(204, 404))
                return
            except ForgeAuthError as exc:
                if exc.status != 401 or not first_try:
                    raise
                await self._refresh(session)

    async def acquire(self, request_ids: Collection[int]) -> list[int]:
        """Claim offered jobs; the answer lists those won (others went elsewhere)."""
        for first_try in (True, False):
            session = self.current
            admin = await self.service.admin()
            url = f"{admin.url.rstrip('/')}/{proto.SCALE_SETS}/{self.scale_set_id}/acquirejobs"
            try:
                _, data = await self.service.send(
                    "POST", url, session.queue_token, body=sorted(request_ids)
                )
            except ForgeAuthError as exc:
                if exc.status != 401 or not first_try:
                    raise
                await self._refresh(session)
                continue
            return proto.parse_acquired(data)
        raise AssertionError("unreachable")  # pragma: no cover


def _decode(raw: bytes, what: str) -> Any:
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # the service may send a UTF-8 byte order mark
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ForgeError(f"{what}: response is not JSON", forge=FORGE) from exc


def _exception(raw: bytes) -> str:
    """The service's exception name and message (``typeKey: message``), cut short."""
    try:
        data = json.loads(raw.removeprefix(b"\xef\xbb\xbf"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return ""
    if not isinstance(data, dict):
        return ""
    kind = data.get("typeKey") or str(data.get("typeName") or "").split(",")[0].split(".")[-1]
    message = data.get("message")
    text = f"{kind}: {message}" if kind and isinstance(message, str) else str(message or kind)
    return text[:200]
