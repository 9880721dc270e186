"""Async client of the daemon's local API, for programs that already run an event loop.

The CLI's commands use the blocking `runner.api.local.DaemonClient`, which starts
~190 ms faster (no asyncio, no aiohttp); both raise the same errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from runner.api.local import ApiError, DaemonUnavailable, error_of

__all__ = ["ApiClient", "ApiError", "DaemonUnavailable"]

class ApiClient:
    """``async with ApiClient(path) as api: await api.submit({...})``."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ApiClient:
        connector = aiohttp.UnixConnector(path=str(self.socket_path))
        self._session = aiohttp.ClientSession(
            connector=connector, base_url="http://snapfleet",
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def submit(
        self, spec: dict[str, Any], *, secret_env: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Queue ``spec``; ``secret_env`` reaches the job's environment but the daemon
        keeps it in memory only (a restart before the job starts ends the job)."""
        body = dict(spec)
        if secret_env:
            body["secret_env"] = {**body.get("secret_env", {}), **secret_env}
        return await self._json("POST", "/v1/jobs", json=body)

    async def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        body = await self._json("GET", "/v1/jobs", params={"limit": str(limit)})
        jobs: list[dict[str, Any]] = body["jobs"]
        return jobs

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self._json("GET", f"/v1/jobs/{job_id}")

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self._json("POST", f"/v1/jobs/{job_id}/cancel")

    async def status(self) -> dict[str, Any]:
        return await self._json("GET", "/v1/status")

    async def acquire_lease(
        self, key: str, profile: str | None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        body = {"key": key, "profile": profile, "timeout_s": timeout_s}
        return await self._json("POST", "/v1/leases", json=body)

    async def release_lease(self, key: str) -> bool:
        body = await self._json("DELETE", f"/v1/leases/{key}")
        return bool(body["released"])

    async def exec_in_lease(
        self,
        key: str,
        script: str,
        on_output: Callable[[str, bytes], None],
        cancel: asyncio.Event,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stage: str | None = None,
    ) -> dict[str, Any]:
        """Run ``script`` (stage ``stage``) in the leased VM; returns the final status frame.

        Setting ``cancel`` asks the daemon to stop the script; the status frame
        that follows still arrives.
        """
        try:
            async with self._sess().ws_connect(f"/v1/leases/{key}/exec") as ws:
                await ws.send_json({"script": script, "env": env, "cwd": cwd, "stage": stage})
                stopper = asyncio.create_task(_send_cancel(ws, cancel))
                try:
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.BINARY:
                            stream = "stdout" if msg.data[:1] == b"\x01" else "stderr"
                            on_output(stream, msg.data[1:])
                        elif msg.type == aiohttp.WSMsgType.TEXT:
                            final: dict[str, Any] = json.loads(msg.data)
                            return final
                finally:
                    stopper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await stopper
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (404, 410):
                raise ApiError(exc.status, f"no VM is held for {key} (was prepare run?)") from exc
            raise ApiError(exc.status, f"exec refused: HTTP {exc.status}") from exc
        except aiohttp.ClientConnectionError as exc:
            raise self._unavailable(exc) from exc
        raise ApiError(500, "the daemon closed the exec stream without a result")

    async def logs(self, job_id: str, *, follow: bool = False, offset: int = 0
                   ) -> AsyncIterator[bytes]:
        params = {"offset": str(offset), "follow": "1" if follow else "0"}
        try:
            async with self._sess().get(f"/v1/jobs/{job_id}/logs", params=params) as resp:
                if resp.status != 200:
                    await self._raise(resp)
                async for chunk in resp.content.iter_any():
                    yield chunk
        except aiohttp.ClientConnectionError as exc:
            raise self._unavailable(exc) from exc

    async def _json(self, method: str, url: str, **kw: Any) -> dict[str, Any]:
        try:
            async with self._sess().request(method, url, **kw) as resp:
                if resp.status >= 400:
                    await self._raise(resp)
                body: dict[str, Any] = await resp.json()
                return body
        except aiohttp.ClientConnectionError as exc:
            raise self._unavailable(exc) from exc

    async def _raise(self, resp: aiohttp.ClientResponse) -> None:
        raise error_of(resp.status, await resp.read())

    def _unavailable(self, exc: Exception) -> DaemonUnavailable:
        return DaemonUnavailable(
            f"cannot reach the daemon at {self.socket_path} ({exc.__class__.__name__}):"
            " is `snapfleet serve` running?"
        )

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use ApiClient as an async context manager")
        return self._session


async def _send_cancel(ws: aiohttp.ClientWebSocketResponse, cancel: asyncio.Event) -> None:
    await cancel.wait()
    with contextlib.suppress(ConnectionError):
        await ws.send_json({"cancel": True})
