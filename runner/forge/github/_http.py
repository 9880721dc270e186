"""One HTTP request to the GitHub REST API, with retries, rate limits and error translation.

Every aiohttp exception and every unhappy status becomes a ``runner.errors``
forge error here. Messages name the method and path, never headers or bodies
we sent (they carry tokens and, for JIT configs, secrets).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from runner import __version__
from runner.errors import ForgeAuthError, ForgeError, ForgeUnavailable
from runner.forge.github.types import FORGE
from runner.secret import Secret

API_VERSION = "2022-11-28"
_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="next"')

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one request tries before giving up with ``ForgeUnavailable``."""

    max_attempts: int = 5
    max_wait_s: float = 120.0
    """Total sleep between the tries of one request; a longer wait is not attempted."""
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    secondary_default_s: float = 60.0
    """GitHub: with no ``retry-after``, wait at least a minute after a secondary limit."""

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with jitter ("equal jitter": half fixed, half random)."""
        cap = min(self.max_delay_s, self.base_delay_s * 2.0 ** (attempt - 1))
        return cap / 2 + rng.uniform(0, cap / 2)


@dataclass(frozen=True)
class Response:
    """A successful response: status, headers and the decoded JSON body (``None`` if empty)."""

    status: int
    headers: Mapping[str, str]
    data: Any

    def next_url(self) -> str | None:
        """The ``rel="next"`` page from the ``Link`` header, if any."""
        match = _NEXT.search(self.headers.get("Link", ""))
        return match.group(1) if match else None


class Transport:
    """Sends requests to one API base URL (GitHub.com, GHES ``/api/v3``, a fake)."""

    def __init__(
        self,
        api_url: str = "https://api.github.com",
        *,
        retry: RetryPolicy | None = None,
        timeout_s: float = 30.0,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.time,
        rng: random.Random | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._retry = retry or RetryPolicy()
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._session = session
        self._own_session = session is None
        self._blocked_until = 0.0

    async def close(self) -> None:
        """Close the HTTP session if this transport made it."""
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        authorization: Secret,
        params: Mapping[str, str | int] | None = None,
        body: Mapping[str, Any] | None = None,
        ok: Collection[int] = (200,),
    ) -> Response:
        """Send one request, retrying what is worth retrying within the policy.

        ``path`` is relative to the API URL, or an absolute URL under it (a
        ``Link`` header's next page). ``authorization`` is the whole header value.
        """
        url, what = self._resolve(method, path)
        waited = 0.0
        for attempt in range(1, self._retry.max_attempts + 1):
            pause = self._blocked_until - self._clock()
            if pause > 0:
                # An earlier response spent the primary limit: wait out the reset.
                waited = await self._wait(pause, waited, what, status=None)
                self._blocked_until = 0.0
            try:
                status, headers, raw = await self._send(method, url, authorization, params, body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                failure: ForgeError = ForgeUnavailable(
                    f"{what}: {type(exc).__name__}: {exc}", forge=FORGE
                )
                delay: float | None = self._retry.backoff(attempt, self._rng)
                cause: BaseException | None = exc
            else:
                self._note_primary_limit(status, headers)
                if status in ok:
                    return Response(status, headers, _decode(raw, what))
                delay, failure = self._classify(status, headers, raw, what, attempt)
                cause = None
            if delay is None or attempt == self._retry.max_attempts:
                raise failure from cause
            if waited + delay > self._retry.max_wait_s:
                raise _with_retry_after(failure, delay) from cause
            await self._sleep(delay)
            waited += delay
        raise AssertionError("unreachable")  # pragma: no cover

    def _resolve(self, method: str, path: str) -> tuple[str, str]:
        if path.startswith(("http://", "https://")):
            # Only ever send our token to the API we were configured with.
            if not path.startswith(self.api_url + "/"):
                raise ForgeError(f"refusing to follow a link off the API: {path}", forge=FORGE)
            url = path
        else:
            url = self.api_url + path
        return url, f"{method} {urlsplit(url).path}"

    async def _send(
        self,
        method: str,
        url: str,
        authorization: Secret,
        params: Mapping[str, str | int] | None,
        body: Mapping[str, Any] | None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": API_VERSION,
            "User-Agent": f"snapfleet/{__version__}",
            "Authorization": authorization.reveal(),
        }
        async with self._session.request(
            method, url, headers=headers, params=params, json=body, timeout=self._timeout
        ) as resp:
            return resp.status, resp.headers, await resp.read()

    async def _wait(self, delay: float, waited: float, what: str, status: int | None) -> float:
        if waited + delay > self._retry.max_wait_s:
            raise ForgeUnavailable(
                f"{what}: rate limited for {delay:.0f} s more",
                forge=FORGE,
                status=status,
                retry_after=delay,
            )
        await self._sleep(delay)
        return waited + delay

    def _note_primary_limit(self, status: int, headers: Mapping[str, str]) -> None:
        reset = headers.get("x-ratelimit-reset")
        if headers.get("x-ratelimit-remaining") == "0" and reset and reset.isdigit():
            self._blocked_until = float(reset) + 1  # +1: reset is whole seconds

    def _classify(
        self, status: int, headers: Mapping[str, str], raw: bytes, what: str, attempt: int
    ) -> tuple[float | None, ForgeError]:
        """How long to wait before retrying (``None``: do not) and the error if we stop."""
        message = f"{what}: {status} {_error_message(raw)}"
        if status in (403, 429):
            delay = self._rate_limit_delay(status, headers, raw)
            if delay is not None:
                return delay, ForgeUnavailable(
                    f"{message} (rate limited)", forge=FORGE, status=status, retry_after=delay
                )
        if status in (401, 403):
            return None, ForgeAuthError(message, forge=FORGE, status=status)
        if status >= 500:
            return self._retry.backoff(attempt, self._rng), ForgeUnavailable(
                message, forge=FORGE, status=status
            )
        return None, ForgeError(message, forge=FORGE, status=status)

    def _rate_limit_delay(
        self, status: int, headers: Mapping[str, str], raw: bytes
    ) -> float | None:
        retry_after = headers.get("retry-after", "")
        if retry_after.isdigit():
            return float(retry_after)
        reset = headers.get("x-ratelimit-reset", "")
        if headers.get("x-ratelimit-remaining") == "0" and reset.isdigit():
            self._blocked_until = 0.0  # this wait replaces the pre-request one
            return max(0.0, float(reset) - self._clock()) + 1
        if status == 429 or "rate limit" in _error_message(raw).lower():
            return self._retry.secondary_default_s
        return None


def _with_retry_after(failure: ForgeError, delay: float) -> ForgeError:
    if isinstance(failure, ForgeUnavailable):
        failure.retry_after = delay
    return failure


def _decode(raw: bytes, what: str) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ForgeError(f"{what}: response is not JSON", forge=FORGE) from exc


def _error_message(raw: bytes) -> str:
    """GitHub's ``message`` field, cut short; it never echoes our credentials."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return ""
    message = data.get("message") if isinstance(data, dict) else None
    return message[:200] if isinstance(message, str) else ""
