"""GitHub Actions as a job source: webhooks in, ephemeral JIT runners in VMs out.

The webhook only records what it heard and wakes the reconcile loop; the
loop (also run every ``reconcile_interval_s``, since GitHub never redelivers)
lists queued jobs and our runners, lets the pure ``reconcile.plan`` decide,
and does what it says: start runner VMs, delete dead registrations, destroy
VMs whose runner never took a job. A runner's JIT config lives only in memory
and reaches the guest through the agent; it is never stored or logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from runner.errors import (
    ConfigError,
    ForgeError,
    SnapfleetError,
    WebhookError,
    WebhookSignatureError,
)
from runner.forge.github import reconcile
from runner.forge.github.api import GitHubClient
from runner.forge.github.config import GitHubConfig
from runner.forge.github.types import Runner, Scope
from runner.forge.github.webhook import (
    DeliveryDedupe,
    Ping,
    WorkflowJobEvent,
    parse_event,
    verify_signature,
)
from runner.listen import TCPListen, describe, parse_listen
from runner.service.jobs import Job, JobSpec
from runner.service.scheduler import choose_profile

if TYPE_CHECKING:
    from runner.service.port import JobPort

log = structlog.get_logger("snapfleet.github")
RUNNER_SCRIPT = "exec /usr/local/bin/snapfleet-github-runner"
JIT_ENV = "ACTIONS_RUNNER_INPUT_JITCONFIG"
FRESH_S = 30.0


@dataclass(frozen=True)
class Queued:
    """A queued GitHub job we can serve."""

    scope: Scope
    profile: str
    repo: str
    seen_at: float
    polled: bool = False  # learnt from the API (not a webhook)


@dataclass
class RunnerVM:
    """One JIT runner we registered and the daemon job whose VM runs it."""

    name: str
    scope: Scope
    profile: str
    registered_at: float
    runner_id: int | None = None
    job_id: str | None = None
    took_job: bool = False


class GitHubSource:
    """Turns queued GitHub jobs into runner VMs on this host."""

    name = "github"
    requeue_on_restart = False  # a runner's JIT config lived in the old daemon's memory

    def __init__(
        self, config: GitHubConfig, daemon: JobPort, client: GitHubClient | None = None
    ) -> None:
        self.config = config
        self.daemon = daemon
        self._client = client
        self.prefix = reconcile.runner_prefix(
            config.runner_name_prefix, config.host or socket.gethostname()
        )
        self.scopes = [Scope.parse(s) for s in config.scopes]
        self.queued: dict[int, Queued] = {}  # by GitHub job id
        self.runners: dict[str, RunnerVM] = {}  # by runner name
        self.dedupe = DeliveryDedupe()
        self._unserved: set[tuple[str, ...]] = set()
        self._wake = asyncio.Event()
        self._poll_next = False  # the next pass must ask GitHub what is still queued
        daemon.subscribe(self._job_ended)

    @property
    def client(self) -> GitHubClient:
        if self._client is None:
            raise RuntimeError("the GitHub source is not open")
        return self._client

    @client.setter
    def client(self, client: GitHubClient) -> None:
        self._client = client

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        """Talk to GitHub, serve webhooks (when configured) and reconcile until closed."""
        async with contextlib.AsyncExitStack() as stack:
            if self._client is None:
                self._client = await stack.enter_async_context(
                    GitHubClient.from_config(self.config)
                )
            if self.config.webhook_secret is not None:
                where = await stack.enter_async_context(
                    serve_webhooks(self, self.config.webhook_listen)
                )
                log.info("serving GitHub webhooks", listen=where)
            loop = asyncio.create_task(self.run(), name="github")
            try:
                yield
            finally:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop

    def status(self) -> dict[str, Any]:
        return {"github": {"queued": len(self.queued), "runners": len(self.runners)}}

    # -- webhook --------------------------------------------------------------

    async def webhook(self, request: web.Request) -> web.Response:
        """`POST /webhooks/github`: verify, dedupe, record, answer at once."""
        body = await request.read()
        secret = self.config.webhook_secret
        try:
            if secret is None:
                raise WebhookSignatureError("webhooks are not configured", forge="github")
            verify_signature(
                secret.get_secret_value().encode(), body,
                request.headers.get("X-Hub-Signature-256"),
            )
        except WebhookSignatureError:
            return web.json_response({"error": "bad or missing signature"}, status=401)
        delivery = request.headers.get("X-GitHub-Delivery", "")
        if self.dedupe.seen(delivery):
            return web.json_response({"duplicate": True})
        try:
            event = parse_event(request.headers.get("X-GitHub-Event", ""), delivery, body)
        except WebhookError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if isinstance(event, Ping):
            return web.json_response({"pong": True})
        if isinstance(event, WorkflowJobEvent):
            self.on_event(event)
            await self._record(event)
            return web.json_response({"accepted": True}, status=202)
        return web.json_response({"ignored": True})

    def on_event(self, event: WorkflowJobEvent) -> None:
        """Record a workflow_job event (no I/O); queued ones wake the loop."""
        bound = log.bind(github_job=event.job_id, repo=event.repo, forge="github")
        if event.action == "queued":
            routed = self._route(event.repo, event.labels)
            if routed is not None:
                self.queued[event.job_id] = routed
                self._wake.set()
        elif event.action in ("in_progress", "completed"):
            self.queued.pop(event.job_id, None)
            runner = self.runners.get(event.runner_name or "")
            if runner is not None:
                runner.took_job = True
            bound.info(f"job {event.action}", runner=event.runner_name,
                       conclusion=event.conclusion)

    async def _record(self, event: WorkflowJobEvent) -> None:
        """Note on our runner's job record which GitHub job it ran and how it ended."""
        runner = self.runners.get(event.runner_name or "")
        if runner is None or runner.job_id is None or event.action not in (
            "in_progress", "completed"
        ):
            return
        ending = f": {event.conclusion}" if event.conclusion else ""
        await self.daemon.annotate(
            runner.job_id,
            f"GitHub job {event.job_id} of {event.repo} {event.action}{ending} ({event.html_url})",
        )

    def _route(self, repo: str, labels: tuple[str, ...] | list[str]) -> Queued | None:
        scope = self._scope_for(repo)
        if scope is None:
            return None
        try:
            profile = choose_profile(self.daemon.settings, None, list(labels))
        except ConfigError:
            key = tuple(sorted(labels))
            if key not in self._unserved:  # log each unserved label set once
                self._unserved.add(key)
                log.info("ignoring jobs with labels no profile serves", labels=list(key))
            return None
        return Queued(scope, profile, repo, time.monotonic())

    def _scope_for(self, repo: str) -> Scope | None:
        owner = repo.split("/")[0]
        for scope in self.scopes:
            if (scope.kind == "repo" and f"{scope.owner}/{scope.repo}" == repo) or (
                scope.kind == "org" and scope.owner == owner
            ):
                return scope
        return None

    # -- the loop -------------------------------------------------------------

    async def run(self) -> None:
        """Reconcile now, then on every webhook and every interval. Never raises.

        A pass woken by a webhook skips polling GitHub for queued jobs (it just
        heard of one): that keeps API round trips off the path to a new runner.
        """
        poll = True
        while True:
            try:
                await self.reconcile_once(poll=poll)
            except asyncio.CancelledError:
                raise
            except SnapfleetError as exc:
                log.warning("github reconcile failed; will retry", error=str(exc))
            except Exception:
                log.exception("github reconcile crashed; will retry")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.reconcile_interval_s)
                poll, self._poll_next = self._poll_next, False
            except TimeoutError:
                poll = True

    async def reconcile_once(self, *, poll: bool = True) -> None:
        """One pass over every polled repository and every scope.

        One that fails (a 403 on one organisation, a renamed repository) does not
        hold up the others: the first error is raised once all have been tried.
        """
        errors: list[SnapfleetError] = []
        if poll:
            await self._poll_queued(errors)
        now = time.time()
        for scope in self.scopes:
            try:
                ours = [r for r in await self.client.list_runners(scope)
                        if r.name.startswith(self.prefix)]
                plan = reconcile.plan(
                    queued=[reconcile.RoutedJob(job_id, q.profile) for job_id, q
                            in self.queued.items() if q.scope == scope],
                    runners=ours,
                    vms=[self._live_vm(r, now) for r in self.runners.values()
                         if r.scope == scope],
                    now=now, idle_limit_s=self.config.idle_limit_s, prefix=self.prefix,
                )
                await self._apply(scope, plan, ours)
            except SnapfleetError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    async def _poll_queued(self, errors: list[SnapfleetError]) -> None:
        """Queued jobs the webhooks may have missed, and ones no longer queued.

        The poll is the truth for its repositories, except for jobs heard of in
        the last ``FRESH_S`` seconds, which the API may not list yet. A repository
        that fails is skipped (its error added to ``errors``).
        """
        for repo in self.config.repos_to_poll():
            name = f"{repo.owner}/{repo.repo}"
            try:
                listed = {job.id: job for job in await self.client.queued_jobs(repo)}
            except SnapfleetError as exc:
                errors.append(exc)
                continue
            fresh = time.monotonic() - FRESH_S
            for job_id, entry in list(self.queued.items()):
                stale = entry.polled or entry.seen_at < fresh
                if entry.repo == name and job_id not in listed and stale:
                    del self.queued[job_id]
            for job_id, job in listed.items():
                if job_id not in self.queued:
                    routed = self._route(job.repo, job.labels)
                    if routed is not None:
                        self.queued[job_id] = dataclasses.replace(routed, polled=True)

    def _live_vm(self, runner: RunnerVM, now: float) -> reconcile.LiveVM:
        job = self.daemon.unfinished(runner.job_id or "")
        # A runner still queued for capacity is not idle yet: its clock starts with its VM.
        started = job.started_at if job is not None and job.started_at else now
        return reconcile.LiveVM(runner.job_id or runner.name, runner.name, runner.profile,
                                started, runner.took_job)

    async def _apply(self, scope: Scope, plan: reconcile.Plan, ours: list[Runner]) -> None:
        for profile, count in plan.start.items():
            for _ in range(count):
                await self.start_runner(scope, profile)
        for runner_id in plan.delete_runners:
            log.info("deleting orphaned runner registration", runner_id=runner_id)
            await self.client.delete_runner(scope, runner_id)
        for teardown in plan.destroy_vms:
            if teardown.runner_id is not None:
                try:
                    await self.client.delete_runner(scope, teardown.runner_id)
                except ForgeError as exc:
                    if exc.status == 422:  # it just took a job: keep its VM
                        continue
                    raise
            runner = self.runners.get(teardown.runner_name)
            if runner is not None and runner.job_id is not None:
                log.info("destroying idle runner VM", runner=runner.name, job_id=runner.job_id)
                await self.daemon.cancel(runner.job_id)

    async def start_runner(self, scope: Scope, profile: str) -> None:
        """Register a JIT runner and queue a VM for it."""
        name = f"{self.prefix}{secrets.token_hex(4)}"
        runner = RunnerVM(name, scope, profile, time.time())
        self.runners[name] = runner  # before registering: never mistaken for an orphan
        try:
            labels = self.daemon.settings.profile(profile).labels
            jit = await self.client.generate_jitconfig(
                scope, name=name, labels=labels, runner_group_id=self.config.runner_group_id
            )
            runner.runner_id = jit.runner_id
            spec = JobSpec(script=RUNNER_SCRIPT, profile=profile, name=f"github runner {name}")
            job = await self.daemon.submit(
                spec, source="github", secret_env={JIT_ENV: jit.encoded_jit_config}
            )
        except BaseException:
            self.runners.pop(name, None)
            raise
        runner.job_id = job.id
        log.info("runner started", runner=name, profile=profile, job_id=job.id, forge="github")

    def _job_ended(self, job: Job) -> None:
        if job.source != "github":
            return
        for name, runner in list(self.runners.items()):
            if runner.job_id == job.id:
                del self.runners[name]
                log.info("runner VM ended", runner=name, job_id=job.id, state=str(job.state))
                # Did its job get taken? Only GitHub knows: poll before starting another.
                self._poll_next = True
                self._wake.set()


@contextlib.asynccontextmanager
async def serve_webhooks(source: GitHubSource, listen: str) -> AsyncIterator[str]:
    """Serve `POST /webhooks/github` on ``host:port``; yields the bound address."""
    where = parse_listen(listen, "github.webhook_listen")
    if not isinstance(where, TCPListen):
        raise ConfigError("github.webhook_listen", f"expected host:port, got {listen!r}")
    app = web.Application(client_max_size=25 * 2**20)  # GitHub caps payloads at 25 MB
    app.router.add_post("/webhooks/github", source.webhook)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, where.host, where.port)
    try:
        await site.start()
        yield describe(runner, where)
    finally:
        await runner.cleanup()
