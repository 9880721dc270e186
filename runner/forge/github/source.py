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
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
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
from runner.forge.github import persist, reconcile
from runner.forge.github.api import GitHubClient
from runner.forge.github.config import GitHubConfig
from runner.forge.github.health import LIKELY_CAUSE, ProfileHealth
from runner.forge.github.pending import RUNNER_SCRIPT, PendingRunner
from runner.forge.github.types import JitConfig, Runner, Scope
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
FRESH_S = 30.0
CLEANUP_S = 10.0
"""Time allowed for deleting our unused registrations at start and at shutdown."""
CHECKS_PER_PASS = 10
"""Jobs looked up one by one per polling pass (those no repository poll covers)."""
FINISHED_KEPT = 10_000
QUEUE_LIMIT_S = 24 * 3600.0
"""GitHub cancels a job queued this long; one we cannot look up is forgotten after it."""


@dataclass(frozen=True)
class Queued:
    """A queued GitHub job we can serve."""

    scope: Scope
    profile: str
    repo: str
    seen_at: float
    """Wall-clock time first heard of (kept across restarts)."""
    polled: bool = False  # learnt from the API (not a webhook)
    labels: tuple[str, ...] = ()


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
        self.health = ProfileHealth()
        self.finished: OrderedDict[int, None] = OrderedDict()  # jobs no longer queued
        self.state_file: Path | None = None  # set in open() unless a test set it
        self._ended: dict[str, RunnerVM] = {}  # VMs gone; did their runner take a job?
        self._checked: dict[int, float] = {}  # job id -> last looked up by id
        self._unserved: set[tuple[str, ...]] = set()
        self._wake = asyncio.Event()
        self._poll_next = False  # the next pass must ask GitHub what is still queued
        self._dirty = False  # queued/finished changed since last saved
        self._shut = False
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
            if self.state_file is None:
                self.state_file = self.daemon.settings.paths.state_dir / "github-queued.json"
            self._load()
            await self._delete_unused(self.scopes, when="start")
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
                await self.shutdown()

    def status(self) -> dict[str, Any]:
        return {"github": {"queued": len(self.queued), "runners": len(self.runners),
                           "unhealthy_profiles": self.unhealthy_profiles()}}

    def unhealthy_profiles(self) -> dict[str, str]:
        """Profiles whose last runners all ended without a job, with the reason."""
        return self.health.unhealthy()

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
            if event.job_id in self.finished:
                # Deliveries arrive out of order: this job already started or ended.
                bound.info("ignoring a late queued delivery")
                return
            routed = self._route(event.repo, event.labels)
            if routed is not None:
                self.queued[event.job_id] = routed
                self._dirty = True
                self._wake.set()
        elif event.action in ("in_progress", "completed"):
            self._finish(event.job_id)
            runner = self.runners.get(event.runner_name or "")
            if runner is not None:
                runner.took_job = True
            ended = self._ended.pop(event.runner_name or "", None)
            if ended is not None:
                self.health.succeeded(ended.profile)
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
        return Queued(scope, profile, repo, time.time(), labels=tuple(labels))

    def _finish(self, job_id: int) -> None:
        """``job_id`` is no longer queued; remember that against late deliveries."""
        self.queued.pop(job_id, None)
        self._checked.pop(job_id, None)
        self.finished[job_id] = None
        self.finished.move_to_end(job_id)
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)
        self._dirty = True

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
        stopping = self.daemon.stopping
        while not stopping.is_set():
            try:
                await self.reconcile_once(poll=poll)
            except asyncio.CancelledError:
                raise
            except SnapfleetError as exc:
                log.warning("github reconcile failed; will retry", error=str(exc))
            except Exception:
                log.exception("github reconcile crashed; will retry")
            self._save()
            self._wake.clear()
            wake = asyncio.ensure_future(self._wake.wait())
            stop = asyncio.ensure_future(stopping.wait())
            done, _ = await asyncio.wait({wake, stop}, timeout=self._next_pass_in(),
                                         return_when=asyncio.FIRST_COMPLETED)
            wake.cancel()
            stop.cancel()
            if wake in done:
                poll, self._poll_next = self._poll_next, False
            else:
                poll = True
        # Shutdown began: register nothing more, and leave nothing of ours behind.
        await self.shutdown()

    def _next_pass_in(self) -> float:
        """The interval, or sooner when a profile with queued jobs ends its backoff."""
        pauses = [self.health.wait_s(q.profile) for q in self.queued.values()]
        return min([self.config.reconcile_interval_s, *(p for p in pauses if p > 0)])

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
                self._judge_ended(scope, ours)
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
            fresh = time.time() - FRESH_S
            for job_id, entry in list(self.queued.items()):
                stale = entry.polled or entry.seen_at < fresh
                if entry.repo == name and job_id not in listed and stale:
                    self._finish(job_id)
            for job_id, job in listed.items():
                if job_id not in self.queued and job_id not in self.finished:
                    routed = self._route(job.repo, job.labels)
                    if routed is not None:
                        self.queued[job_id] = dataclasses.replace(routed, polled=True)
                        self._dirty = True
        await self._check_by_id(errors, polled={f"{r.owner}/{r.repo}" for r in
                                                self.config.repos_to_poll()})

    async def _check_by_id(self, errors: list[SnapfleetError], polled: set[str]) -> None:
        """Ask the API about queued jobs no repository poll vouched for, a few per pass.

        Those are jobs of repositories not polled (an organisation scope's) and
        webhook jobs too fresh for the list: each is looked up by id, least
        recently checked first, at most ``CHECKS_PER_PASS`` per pass.
        """
        fresh = time.time() - FRESH_S
        unvouched = [job_id for job_id, q in self.queued.items()
                     if q.repo not in polled or (not q.polled and q.seen_at >= fresh)]
        unvouched.sort(key=lambda job_id: self._checked.get(job_id, 0.0))
        for job_id in unvouched[:CHECKS_PER_PASS]:
            entry = self.queued.get(job_id)
            if entry is None:
                continue
            try:
                status = await self.client.job_status(entry.repo, job_id)
            except SnapfleetError as exc:
                errors.append(exc)
                continue
            self._checked[job_id] = time.time()
            if status is None and entry.seen_at > time.time() - QUEUE_LIMIT_S:
                continue  # 404: gone, or a repository this token cannot read; keep it a while
            if status != "queued":
                log.info("queued job is no longer queued", github_job=job_id, status=status)
                self._finish(job_id)

    def _live_vm(self, runner: RunnerVM, now: float) -> reconcile.LiveVM:
        job = self.daemon.unfinished(runner.job_id or "")
        # A runner still queued for capacity is not idle yet: its clock starts with its VM.
        started = job.started_at if job is not None and job.started_at else now
        return reconcile.LiveVM(runner.job_id or runner.name, runner.name, runner.profile,
                                started, runner.took_job)

    async def _apply(self, scope: Scope, plan: reconcile.Plan, ours: list[Runner]) -> None:
        for profile, count in plan.start.items():
            if self.health.wait_s(profile) > 0:
                continue  # backing off: the loop comes back when the pause ends
            for _ in range(count):
                if self.daemon.stopping.is_set():
                    return
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
        """Queue a VM for a new JIT runner and register the runner while the VM restores
        (nothing once shutdown began). The VM runs the runner as soon as both are done:
        with a hot clone, as soon as GitHub answers."""
        if self.daemon.stopping.is_set():
            return
        name = f"{self.prefix}{secrets.token_hex(4)}"
        runner = RunnerVM(name, scope, profile, time.time())
        self.runners[name] = runner  # before registering: never mistaken for an orphan
        labels = self.daemon.settings.profile(profile).labels
        spec = JobSpec(script=RUNNER_SCRIPT, profile=profile, name=f"github runner {name}")

        async def register() -> JitConfig:
            return await self.client.generate_jitconfig(
                scope, name=name, labels=labels, runner_group_id=self.config.runner_group_id
            )

        async def unregister(jit: JitConfig) -> None:
            await self.client.delete_runner(scope, jit.runner_id)

        try:
            vm = await PendingRunner.queue(self.daemon, spec, source="github")
            runner.job_id = vm.job_id
            jit = await vm.register(register, unregister=unregister)
        except BaseException:
            self.runners.pop(name, None)  # its VM ending is no news about the runner
            raise
        if jit is None:
            self.runners.pop(name, None)
            if self._shut:  # shutdown ended its VM: no news about the profile
                return
            pause = self.health.failed(profile)
            # Its job's record says why (a failed restore, most likely).
            log.warning("runner VM ended before its runner was registered; registration "
                        "removed, backing off the profile", runner=name, profile=profile,
                        job_id=vm.job_id, pause_s=pause, forge="github")
            return
        runner.runner_id = jit.runner_id
        log.info("runner started", runner=name, profile=profile, job_id=vm.job_id,
                 forge="github")

    def _job_ended(self, job: Job) -> None:
        if job.source != "github":
            return
        for name, runner in list(self.runners.items()):
            # One still registering is its start path's to settle (see `pending`).
            if runner.job_id == job.id and runner.runner_id is not None:
                del self.runners[name]
                log.info("runner VM ended", runner=name, job_id=job.id, state=str(job.state))
                if runner.took_job:
                    self.health.succeeded(runner.profile)
                else:
                    self._ended[name] = runner  # the next pass asks GitHub
                # Did its job get taken? Only GitHub knows: poll before starting another.
                self._poll_next = True
                self._wake.set()

    def _judge_ended(self, scope: Scope, ours: list[Runner]) -> None:
        """Did runners whose VM ended take a job? GitHub removes an ephemeral runner
        after its job; a registration still there, idle, means it never took one."""
        listed = {r.name: r for r in ours}
        for name, runner in list(self._ended.items()):
            if runner.scope != scope:
                continue
            del self._ended[name]
            registration = listed.get(name)
            if registration is None or registration.busy:
                self.health.succeeded(runner.profile)
                continue
            pause = self.health.failed(runner.profile)
            log.warning("runner VM ended without taking a job; backing off the profile",
                        runner=name, profile=runner.profile, pause_s=pause,
                        in_a_row=self.health.streak(runner.profile), cause=LIKELY_CAUSE,
                        forge="github")

    # -- start and shutdown -------------------------------------------------------

    async def shutdown(self) -> None:
        """Delete the registrations of our runners that took no job and end their VMs.

        Runs once, as soon as shutdown begins (bounded by ``CLEANUP_S``); runners
        busy with a job are left to finish within the daemon's grace.
        """
        if self._shut:
            return
        self._shut = True
        self._save()
        if self._client is None:
            return
        try:
            async with asyncio.timeout(CLEANUP_S):
                for runner in list(self.runners.values()):
                    if runner.took_job:
                        continue
                    if runner.runner_id is not None:
                        try:
                            await self.client.delete_runner(runner.scope, runner.runner_id)
                        except ForgeError as exc:
                            if exc.status == 422:  # it took a job just now: let it run
                                continue
                            raise
                    self.runners.pop(runner.name, None)
                    if runner.job_id is not None:
                        with contextlib.suppress(KeyError, SnapfleetError):
                            await self.daemon.cancel(runner.job_id)
                    log.info("deleted unused runner at shutdown", runner=runner.name)
        except (TimeoutError, SnapfleetError) as exc:
            log.warning("could not delete every unused runner at shutdown; the next start will",
                        error=str(exc) or "timed out", forge="github")

    async def _delete_unused(self, scopes: list[Scope], *, when: str) -> None:
        """Delete our registrations that no job holds (at start: none has a VM yet)."""
        try:
            async with asyncio.timeout(CLEANUP_S):
                for scope in scopes:
                    for runner in await self.client.list_runners(scope):
                        if runner.name.startswith(self.prefix) and not runner.busy:
                            await self.client.delete_runner(scope, runner.id)
                            log.info(f"deleted unused runner at {when}", runner=runner.name)
        except (TimeoutError, SnapfleetError) as exc:
            log.warning(f"could not delete every unused runner at {when}",
                        error=str(exc) or "timed out", forge="github")

    # -- queued jobs kept across restarts --------------------------------------------

    def _load(self) -> None:
        if self.state_file is None:
            return
        jobs, finished = persist.load(self.state_file)
        self.finished.update((job_id, None) for job_id in finished)
        for saved in jobs:
            routed = self._route(saved.repo, saved.labels)
            if routed is not None and saved.job_id not in self.finished:
                self.queued[saved.job_id] = dataclasses.replace(
                    routed, seen_at=saved.seen_at, polled=saved.polled)
        if self.queued:
            log.info("queued jobs restored", count=len(self.queued), forge="github")

    def _save(self) -> None:
        if self.state_file is None or not self._dirty:
            return
        jobs = [persist.SavedJob(job_id, q.repo, q.labels, q.seen_at, q.polled)
                for job_id, q in self.queued.items()]
        try:
            persist.save(self.state_file, jobs, list(self.finished)[-1000:])
            self._dirty = False
        except OSError as exc:
            log.warning("could not save queued GitHub jobs", error=str(exc))


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
