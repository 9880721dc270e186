"""The GitHub REST calls Snapfleet needs: JIT runners, runner listing/removal, queued jobs.

Direct REST over aiohttp for both repository and organization scopes (see
``GitHubClient``). All failures arrive as ``runner.errors`` forge errors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from runner.errors import ConfigError, ForgeAuthError, ForgeError
from runner.forge.github._http import Clock, Response, RetryPolicy, Transport
from runner.forge.github.auth import AppCredentials, Credentials, TokenCredentials
from runner.forge.github.config import GitHubConfig
from runner.forge.github.types import FORGE, JitConfig, QueuedJob, Runner, Scope
from runner.secret import Secret

PER_PAGE = 100
T = TypeVar("T")


class GitHubClient:
    """Async client for one GitHub API (GitHub.com, Enterprise Server, or a test fake).

    Why not PyGithub: it lacks the repository-level JIT call, its JIT result's
    ``repr`` prints the secret, it blocks (a thread per call), and it brings
    its own retry and rate-limit rules. One aiohttp path for both scopes gives
    one set of retries, one error translation and one fake to test against.
    """

    def __init__(self, credentials: Credentials, transport: Transport) -> None:
        self._credentials = credentials
        self._transport = transport

    @classmethod
    def from_config(
        cls, config: GitHubConfig, *, clock: Clock = time.time, **transport_options: Any
    ) -> GitHubClient:
        """Build the client ``config`` describes; ``transport_options`` go to ``Transport``."""
        credentials: Credentials
        if config.token is not None:
            credentials = TokenCredentials(Secret(config.token.get_secret_value()))
        elif config.app_id and config.installation_id and config.private_key_path:
            credentials = AppCredentials.from_file(
                config.app_id, config.installation_id, config.private_key_path, clock=clock
            )
        else:  # pragma: no cover - GitHubConfig's validator rules this out
            raise ConfigError("github", "no credentials")
        transport_options["clock"] = clock
        retry = RetryPolicy(max_attempts=config.max_attempts, max_wait_s=config.max_wait_s)
        transport_options.setdefault("retry", retry)
        transport_options.setdefault("timeout_s", config.request_timeout_s)
        return cls(credentials, Transport(config.api_url, **transport_options))

    @property
    def transport(self) -> Transport:
        """The transport to the REST API (the scale-set client posts its registration there)."""
        return self._transport

    async def close(self) -> None:
        """Close the HTTP session."""
        await self._transport.close()

    async def __aenter__(self) -> GitHubClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def generate_jitconfig(
        self,
        scope: Scope | str,
        *,
        name: str,
        labels: Sequence[str],
        runner_group_id: int,
        work_folder: str = "_work",
    ) -> JitConfig:
        """Register an ephemeral just-in-time runner; its config is for ``run.sh --jitconfig``.

        A ``ForgeError`` with status 409 means a runner of that name exists
        (perhaps our own earlier try whose answer was lost): pick a new name;
        reconcile removes the orphan once it is offline with no VM.
        """
        scope = _scope(scope)
        body = {
            "name": name,
            "runner_group_id": runner_group_id,
            "labels": list(labels),
            "work_folder": work_folder,
        }
        resp = await self._call(
            "POST", f"{scope.path}/actions/runners/generate-jitconfig", body=body, ok=(201,)
        )

        def parse(data: Any) -> JitConfig:
            runner = data["runner"]
            config = data["encoded_jit_config"]
            if not isinstance(config, str):
                raise TypeError("encoded_jit_config")
            return JitConfig(_int(runner["id"]), str(runner["name"]), Secret(config))

        return _shape(parse, resp.data, "generate-jitconfig")

    async def registration_token(self, scope: Scope | str) -> tuple[Secret, float]:
        """A runner registration token for ``scope`` and when it expires (epoch seconds).

        The scale-set client trades it for the Actions service's admin token.
        """
        scope = _scope(scope)
        resp = await self._call(
            "POST", f"{scope.path}/actions/runners/registration-token", ok=(201,)
        )

        def parse(data: Any) -> tuple[Secret, float]:
            token, expires = data["token"], data["expires_at"]
            if not isinstance(token, str) or not isinstance(expires, str):
                raise TypeError("token, expires_at")
            return Secret(token), datetime.fromisoformat(expires).timestamp()

        return _shape(parse, resp.data, "registration-token")

    async def list_runners(self, scope: Scope | str, *, name: str | None = None) -> list[Runner]:
        """Every self-hosted runner registered in ``scope`` (all pages), or those named ``name``."""
        scope = _scope(scope)
        params: dict[str, str | int] = {"name": name} if name else {}
        items = await self._paginate(f"{scope.path}/actions/runners", "runners", params)
        return [_shape(_runner, item, "runners") for item in items]

    async def delete_runner(self, scope: Scope | str, runner_id: int) -> None:
        """Remove a runner registration; one that is already gone (404) is fine.

        A ``ForgeError`` with status 422 means the runner is running a job now.
        """
        scope = _scope(scope)
        await self._call("DELETE", f"{scope.path}/actions/runners/{runner_id}", ok=(204, 404))

    async def queued_jobs(
        self, repo: Scope | str, *, run_statuses: Collection[str] = ("queued", "in_progress")
    ) -> list[QueuedJob]:
        """Jobs with status ``queued`` in the repository's queued and in-progress runs.

        In-progress runs are read too: a run is ``in_progress`` as soon as one
        of its jobs started, while its other jobs (matrix legs, later stages)
        may still be waiting for a runner.
        """
        repo = _scope(repo)
        if repo.kind != "repo":
            raise ForgeError(f"queued_jobs needs 'owner/repo', got {repo}", forge=FORGE)
        run_ids: dict[int, None] = {}
        for status in run_statuses:
            runs = await self._paginate(
                f"{repo.path}/actions/runs", "workflow_runs", {"status": status}
            )
            for run in runs:
                run_ids[_shape(lambda r: _int(r["id"]), run, "workflow_runs")] = None
        jobs: list[QueuedJob] = []
        for run_id in run_ids:
            items = await self._paginate(
                f"{repo.path}/actions/runs/{run_id}/jobs", "jobs", {"filter": "latest"}
            )
            for item in items:
                job = _shape(lambda j: _job(j, str(repo)), item, "jobs")
                if job is not None:
                    jobs.append(job)
        return jobs

    async def job_status(self, repo: Scope | str, job_id: int) -> str | None:
        """A workflow job's status (``queued``, ``in_progress``, ``completed``...).

        ``None`` when GitHub answers 404: the job is gone, or this token may not
        read the repository (GitHub answers both the same way).
        """
        repo = _scope(repo)
        try:
            resp = await self._call("GET", f"{repo.path}/actions/jobs/{job_id}")
        except ForgeError as exc:
            if exc.status == 404:
                return None
            raise
        return _shape(lambda d: str(d["status"]), resp.data, "job")

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: Mapping[str, Any] | None = None,
        ok: Collection[int] = (200,),
    ) -> Response:
        for first_try in (True, False):
            authorization = await self._credentials.authorization(self._transport)
            try:
                return await self._transport.request(
                    method, path, authorization=authorization, params=params, body=body, ok=ok
                )
            except ForgeAuthError as exc:
                # A revoked or expired installation token: fetch a new one, once.
                if exc.status != 401 or not first_try:
                    raise
                self._credentials.invalidate()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _paginate(
        self, path: str, key: str, params: Mapping[str, str | int]
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        next_path: str | None = path
        query: Mapping[str, str | int] | None = {**params, "per_page": PER_PAGE}
        while next_path is not None:
            resp = await self._call("GET", next_path, params=query)
            page = _shape(lambda d: list(d[key]), resp.data, key)
            items.extend(page)
            next_path = resp.next_url()
            query = None  # the Link URL carries the query already
        return items


def _scope(scope: Scope | str) -> Scope:
    return scope if isinstance(scope, Scope) else Scope.parse(scope)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an integer")
    return value


def _runner(data: Any) -> Runner:
    labels = tuple(str(label["name"]) for label in data["labels"])
    return Runner(
        _int(data["id"]), str(data["name"]), str(data["status"]), bool(data["busy"]), labels
    )


def _job(data: Any, repo: str) -> QueuedJob | None:
    if data["status"] != "queued":
        return None
    labels = tuple(str(label) for label in data["labels"])
    return QueuedJob(_int(data["id"]), _int(data["run_id"]), labels, repo)


def _shape(parse: Callable[[Any], T], data: Any, what: str) -> T:
    """Apply ``parse``; a missing or mistyped field means GitHub answered something unexpected."""
    try:
        return parse(data)
    except (KeyError, TypeError, ValueError) as exc:
        message = f"unexpected {what} response: {type(exc).__name__} {exc}"
        raise ForgeError(message, forge=FORGE) from exc
