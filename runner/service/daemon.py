"""`snapfleet serve`: the long-running daemon.

Start: open state, reconcile the host (orphans reclaimed, lost jobs failed),
requeue queued jobs, open the API, tell systemd READY. Then schedule jobs
FIFO within capacity, reconcile periodically, ping the watchdog. SIGTERM:
stop taking jobs, let running ones finish within the grace, cancel the rest,
reclaim everything, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from typing import Any

import structlog

from runner.config import Settings
from runner.engine import Engine
from runner.errors import ConfigError, Draining, SnapfleetError
from runner.execution import Command, Outcome, Restored, Work, command_work, run
from runner.gpu.config import GpuRequest
from runner.secret import Secret
from runner.service import recovery
from runner.service.jobs import TERMINAL, Job, JobSpec, JobState, new_job_id
from runner.service.logs import JobLog, LogStore
from runner.service.metrics import Metrics, serve_metrics
from runner.service.notify import Notifier, watchdog_loop
from runner.service.port import JobListener, JobSource
from runner.service.scheduler import (
    Resources,
    choose_profile,
    demand,
    gpu_capacity,
    gpu_refusal,
    host_capacity,
    plan_starts,
    refusal,
    room,
    wait_reason,
)
from runner.service.store import Store
from runner.vm.backend import Machine

log = structlog.get_logger("snapfleet.daemon")


def _progress_logger(profile: str) -> Callable[[str], None]:
    bound = log.bind(profile=profile)
    return lambda step: bound.info("warm pool", step=step)


RESTART_REASON = "the daemon restarted before this job started; its forge will retry"
UNKNOWN_SOURCE_REASON = "the daemon restarted without the job source that queued this job"
INVALID_SPEC_REASON = "this job was queued by an older version and fails today's checks"


class Daemon:
    """One host's fleet daemon: the `JobPort` its job sources submit through."""

    def __init__(
        self, settings: Settings, engine: Engine, *, notifier: Notifier | None = None
    ) -> None:
        self.settings = settings
        self.engine = engine
        state = settings.paths.state_dir
        self.store = Store(state / "snapfleet.db")
        self.logs = LogStore(state / "logs", settings.daemon.log_max_bytes)
        self.metrics = Metrics()
        self.notifier = notifier or Notifier()
        self.total = host_capacity(settings)
        if engine.gpus is not None:  # the allocator's devices are the GPU capacity
            units = len(engine.gpus.source.units())
            self.total = replace(self.total, gpus=gpu_capacity(settings.capacity.gpus, units))
        else:
            self.total = replace(self.total, gpus=0)
        self._gpu_units: dict[str, tuple[str, ...]] = {}  # running jobs' chosen GPU units
        self.used = Resources()
        self.jobs: dict[str, Job] = {}  # unfinished jobs, by id
        self.queue: list[str] = []  # FIFO of queued job ids
        self.tasks: dict[str, asyncio.Task[None]] = {}  # running jobs
        self.sources: dict[str, JobSource] = {}
        self._works: dict[str, Work] = {}  # jobs whose work is not their script
        self._listeners: list[JobListener] = []  # told when a job ends
        self.accepting = False
        self.stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._progress = time.monotonic()

    # -- lifecycle ------------------------------------------------------------

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT (or ``stop()``); always reclaims what it made."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            async with self.engine:
                await self.store.open()
                try:
                    await self._start()
                finally:
                    await self.store.close()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def stop(self) -> None:
        """Begin a graceful shutdown."""
        if not self.stopping.is_set():
            log.info("shutdown requested", running=len(self.tasks), queued=len(self.queue))
            self.notifier.stopping()
            self.accepting = False
            self.stopping.set()
            self._wake.set()

    def add_source(self, source: JobSource) -> None:
        """Serve ``source`` (before `serve`): its ``open`` is entered before READY."""
        if source.name in self.sources:
            raise ValueError(f"two job sources named {source.name!r}")
        self.sources[source.name] = source

    def subscribe(self, listener: JobListener) -> None:
        self._listeners.append(listener)

    async def _start(self) -> None:
        await self.reconcile(startup=True)
        if self.engine.gpus is not None:
            # Orphaned QEMUs are gone now: devices leased by the last run go back.
            await self.engine.gpus.recover(self.engine.hypervisor.live)
        for job in await self.store.jobs(states=[JobState.QUEUED], limit=100_000):
            source = self.sources.get(job.source)
            if source is None or not source.requeue_on_restart:
                # A GitLab lease or GitHub runner depended on memory the old daemon took
                # with it (its driver, its JIT config); the forge side starts anew.
                why = RESTART_REASON if source is not None else UNKNOWN_SOURCE_REASON
                await self.store.transition(job, JobState.SYSTEM_FAILURE, reason=why)
                continue
            if job.spec_problem is not None:
                await self.store.transition(job, JobState.SYSTEM_FAILURE, reason=(
                    f"{INVALID_SPEC_REASON}: {job.spec_problem}"))
                continue
            if (lost := recovery.secrets_lost(job)) is not None:
                await self.store.transition(job, JobState.SYSTEM_FAILURE, reason=lost)
                continue
            self.jobs[job.id] = job
            self.queue.append(job.id)
        self.accepting = True
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(serve_metrics(
                self.metrics, self.settings.daemon.metrics_listen,
                group=self.settings.daemon.api_group,
            ))
            for source in self.sources.values():
                await stack.enter_async_context(source.open())
            self._update_gauges()
            self.notifier.ready(f"serving; {len(self.queue)} queued")
            log.info("ready", capacity=self.total, queued=len(self.queue))
            async with asyncio.TaskGroup() as group:
                background = [
                    group.create_task(self._warm_pools(), name="warm-pools"),
                    group.create_task(self._reconcile_loop(), name="reconcile"),
                    group.create_task(watchdog_loop(self.notifier, self._healthy), name="watchdog"),
                ]
                try:
                    await self._schedule_loop()
                    await self._drain()
                finally:
                    # Reached early only if something failed (a background task or the
                    # scheduler): end the running jobs now, while store and engine are
                    # still open, so their VMs are torn down and their outcomes recorded.
                    await self._cancel_running("the daemon hit an internal error")
                    for task in background:
                        task.cancel()
        log.info("stopped")

    async def _cancel_running(self, reason: str) -> None:
        """Cancel every running job (keeping a reason already given) and wait for them."""
        tasks = dict(self.tasks)
        for job_id, task in tasks.items():
            if (job := self.jobs.get(job_id)) is not None and job.reason is None:
                job.reason = f"cancelled: {reason}"
            task.cancel()
        if tasks:
            await asyncio.wait(tasks.values())

    async def _warm_pools(self) -> None:
        """Start each profile's warm and hot pools (after READY: a first snapshot can take
        minutes)."""
        for name, profile in self.settings.profiles.items():
            if profile.warm <= 0 and profile.hot <= 0:
                continue
            try:
                snapshot = await self.engine.snapshot(profile, _progress_logger(name))
            except SnapfleetError as exc:
                log.error("pools disabled", profile=name, error=str(exc))
                continue
            if profile.warm > 0:
                self.engine.warm(name, profile, snapshot)
            if profile.hot > 0:
                self.engine.keep_hot(profile, snapshot)
            log.info("pools started", profile=name, warm=profile.warm, hot=profile.hot)

    def _healthy(self) -> bool:
        # The scheduler loop wakes at least every few seconds; if it stalls, stop pinging.
        return time.monotonic() - self._progress < 60

    # -- jobs -----------------------------------------------------------------

    async def submit(
        self, spec: JobSpec, *, source: str,
        secret_env: Mapping[str, Secret] | None = None,
        work: Work | None = None,
    ) -> Job:
        """Queue a job; ConfigError (with the reason) if no profile can run it.

        ``secret_env`` stays in this process's memory: the store keeps only its names.
        ``work`` (in memory too) replaces running the spec's script.
        """
        if not self.accepting:
            raise Draining("the daemon is shutting down and takes no new jobs")
        try:
            profile_name = choose_profile(self.settings, spec.profile, spec.labels)
            profile = self.settings.profile(profile_name)
            why = refusal(demand(profile), self.total) or gpu_refusal(
                profile.gpu_request(), self._units(free=False))
            if why is not None:
                raise ConfigError("profile", f"profile {profile_name!r} {why}")
        except ConfigError:
            self.metrics.job_finished("refused")
            raise
        job = Job(id=new_job_id(), spec=spec, profile=profile_name, source=source,
                  secret_env=dict(secret_env or {}))
        await self.store.add_job(job)
        if work is not None:
            self._works[job.id] = work
        self.jobs[job.id] = job
        self.queue.append(job.id)
        self._update_gauges()
        self._wake.set()
        log.info("job queued", job_id=job.id, profile=profile_name, forge=source)
        return job

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job. KeyError if unknown; returns the job."""
        job = self.jobs.get(job_id) or await self.store.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.state in TERMINAL:
            return job
        if job.id in self.queue:
            self.queue.remove(job.id)
            await self._finish(job, Outcome(JobState.CANCELLED, reason="cancelled by user"))
        elif (task := self.tasks.get(job.id)) is not None:
            job.reason = "cancelled by user"
            # Not task.cancel() at once: a task cancelled before its first step never runs
            # its body, so its finally (capacity, outcome) would never run either. Its
            # first step is already queued, ahead of this call.
            asyncio.get_running_loop().call_soon(task.cancel)
        return job

    async def annotate(self, job_id: str, note: str) -> None:
        """Record something a forge said about a job: in its log and its history."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        if (live := self.logs.live.get(job_id)) is not None:
            live.note(note)
        await self.store.annotate(job, note)

    async def job(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id) or await self.store.get(job_id)

    def free_slots(self, profile: str) -> int:
        if not self.accepting:
            return 0
        queued = [demand(self.settings.profile(self.jobs[j].profile)) for j in self.queue]
        return room(demand(self.settings.profile(profile)), self.total - self.used,
                    self.settings.capacity.max_concurrency - len(self.tasks), queued)

    def waiting(self, job_id: str) -> str | None:
        if job_id not in self.queue:
            return None
        if not self.accepting:
            return "the daemon is shutting down"
        slots = self.settings.capacity.max_concurrency - len(self.tasks)
        return wait_reason(self._queue(), job_id, self.total - self.used, slots,
                           self._units(free=True))

    def unfinished(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def job_log(self, job_id: str) -> JobLog | None:
        return self.logs.live.get(job_id)

    async def recent_jobs(self, limit: int) -> list[Job]:
        return await self.store.jobs(limit=limit)

    async def history(self, job_id: str) -> list[tuple[str, float, str | None]]:
        return await self.store.history(job_id)

    async def follow_log(self, job_id: str, offset: int, *, follow: bool
                         ) -> AsyncIterator[bytes]:
        def finished() -> bool:
            return job_id not in self.jobs  # unfinished jobs live there until their log closed

        async for chunk in self.logs.follow(job_id, offset,
                                            finished=finished if follow else None):
            yield chunk

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "accepting": self.accepting,
            "capacity": {"total": vars(self.total), "used": vars(self.used),
                         "max_concurrency": self.settings.capacity.max_concurrency},
            "running": sorted(self.tasks),
            "queued": list(self.queue),
            "vms": sorted(self.engine.hypervisor.live),
            "pools": self._pools(),
        }
        for source in self.sources.values():
            status.update(source.status())
        return status

    def _pools(self) -> dict[str, dict[str, int]]:
        """Per profile with a pool: how many clones wait hot and VMMs wait warm."""
        hot = self.engine.hot.stats()
        warm = self.engine.pool.idle_by_slot()
        pools = {}
        for name, profile in self.settings.profiles.items():
            if profile.hot or profile.warm:
                mine = hot.get(self.engine.hot_key(profile))
                pools[name] = {"hot": 0 if mine is None else mine.idle,
                               "hot_target": profile.hot, "warm": warm.get(name, 0),
                               "warm_target": profile.warm}
        return pools

    # -- scheduling -----------------------------------------------------------

    async def _schedule_loop(self) -> None:
        while not self.stopping.is_set():
            self._progress = time.monotonic()
            slots = self.settings.capacity.max_concurrency - len(self.tasks)
            for job_id, units in plan_starts(self._queue(), self.total - self.used, slots,
                                             self._units(free=True)):
                self.queue.remove(job_id)
                self._gpu_units[job_id] = units
                await self._launch(self.jobs[job_id])
            self._update_gauges()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=5.0)

    def _queue(self) -> list[tuple[str, Resources, GpuRequest | None]]:
        queue = []
        for jid in self.queue:
            profile = self.settings.profile(self.jobs[jid].profile)
            queue.append((jid, demand(profile), profile.gpu_request()))
        return queue

    def _units(self, *, free: bool) -> list[tuple[str, str]]:
        """GPU units as (id, model): all of them, or those free and not yet promised to a
        starting job."""
        gpus = self.engine.gpus
        if gpus is None:
            return []
        if not free:
            return [(u.id, u.model) for u in gpus.source.units()]
        promised = {uid for units in self._gpu_units.values() for uid in units}
        return [(u.id, u.model) for u in gpus.free_units() if u.id not in promised]

    async def _launch(self, job: Job) -> None:
        need = demand(self.settings.profile(job.profile))
        self.used = self.used + need
        # The task is registered before anything awaits, so a cancel() from now on finds it
        # and whatever fails from now on (even recording STARTING) returns the capacity.
        task = asyncio.create_task(self._supervise(job, need), name=f"job-{job.id}")
        self.tasks[job.id] = task

    async def _supervise(self, job: Job, need: Resources) -> None:
        """Own one job's task: run it, record the outcome whatever happens."""
        profile = self.settings.profile(job.profile)
        job_log = self.logs.open(job.id)
        outcome = Outcome(JobState.SYSTEM_FAILURE, reason="did not finish")
        restored: Restored | None = None
        timeout = job.spec.timeout_s or profile.timeout_s
        work = self._works.pop(job.id, None) or command_work(
            Command(argv=job.spec.command, script=job.spec.script, env=job.environment(),
                    cwd=job.spec.workdir),
            lambda _stream, data: job_log.write(data),
            timeout,
        )

        async def on_ready(machine: Machine, made: Restored) -> None:
            await self.store.lease(machine.vm_id, job.id, machine.pid)
            await self.store.transition(job, JobState.RUNNING, vm_id=machine.vm_id)

        try:
            await self.store.transition(job, JobState.STARTING)
            self.metrics.observe_queue_wait(time.time() - job.created_at)
            report = await run(
                self.engine, profile, work, timeout_s=timeout, note=job_log.note,
                on_ready=on_ready,
                context={"job_id": job.id, "forge": job.source, "profile": job.profile},
                gpus=self._gpu_units.get(job.id) or None,
            )
            outcome, restored = report.outcome, report.restored
        except asyncio.CancelledError:
            outcome = Outcome(JobState.CANCELLED, reason=job.reason or "cancelled")
            raise
        finally:
            if job.vm_id is not None:
                await asyncio.shield(self.store.release(job.vm_id))
            job_log.note(f"job {outcome.state}" + (f": {outcome.reason}" if outcome.reason
                                                    else ""))
            job.log_bytes = job_log.size
            self.logs.close(job.id)
            self.used = self.used - need
            self._gpu_units.pop(job.id, None)
            self.tasks.pop(job.id, None)
            await asyncio.shield(self._finish(job, outcome, restored))
            self._wake.set()

    async def _finish(self, job: Job, outcome: Outcome, restored: Restored | None = None
                      ) -> None:
        self._works.pop(job.id, None)
        try:
            if job.state not in TERMINAL:
                await self.store.transition(
                    job, outcome.state, reason=outcome.reason, exit_code=outcome.exit_code,
                    log_bytes=job.log_bytes,
                )
        except Exception:
            # The record stays behind (recovery fails it later); the job itself is over.
            log.exception("could not record the job's outcome", job_id=job.id)
        self.jobs.pop(job.id, None)
        job.secret_env.clear()  # the job is over: nothing needs its secrets any more
        for listener in self._listeners:
            try:
                listener(job)
            except Exception:
                log.exception("a job source failed on a job's end", job_id=job.id)
        self.metrics.job_finished(outcome.metric)
        if restored is not None:
            self.metrics.observe_restore(
                restored.restore_s, pool="hot" if restored.hot else
                "warm" if restored.warm else "cold")
        self._update_gauges()

    async def _drain(self) -> None:
        """Shutdown: running jobs get the grace period, then are cancelled."""
        if not self.tasks:
            return
        grace = self.settings.daemon.shutdown_grace_s
        log.info("waiting for running jobs", count=len(self.tasks), grace_s=grace)
        # The grace may be longer than the unit's TimeoutStopSec: ask for it (and a
        # margin for teardown) so systemd does not SIGKILL jobs it meant to let finish.
        self.notifier.extend_timeout(grace + 30)
        await asyncio.wait(list(self.tasks.values()), timeout=grace)
        await self._cancel_running("the daemon shut down")  # those still running

    # -- reconcile ------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.daemon.reconcile_interval_s)
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconcile failed; will retry")

    async def reconcile(self, *, startup: bool = False) -> recovery.Plan:
        """Compare records with the host; reclaim orphans, fail lost jobs."""
        hv = self.engine.hypervisor
        scope = (self.settings.vm.cgroup_root, hv.instance) if self.settings.vm.cgroup else None
        observed = await recovery.observe(hv, scope)
        unfinished = {j.id: j.state for j in await self.store.jobs(
            states=[JobState.STARTING, JobState.RUNNING], limit=100_000)}
        leases = await self.store.leases()
        plan = recovery.plan(observed, hv.live, unfinished, self.tasks, leases)
        if not plan.empty:
            log.warning("reconciling", startup=startup, orphans=sorted(plan.dirs | plan.networks
                        | plan.cgroups
                        | set(plan.kill)), lost_jobs=list(plan.fail_jobs))
        for problem in await recovery.apply(plan, hv, scope):
            log.error("reconcile", problem=problem)
        for job_id in plan.fail_jobs:
            job = await self.store.get(job_id)
            if job is not None and job.state not in TERMINAL:
                await self.store.transition(job, JobState.SYSTEM_FAILURE,
                                            reason=recovery.LOST_JOB_REASON)
                self.metrics.job_finished("system_failure")
        for vm_id in plan.release_leases:
            await self.store.release(vm_id)
        self.metrics.recovered("orphan_vm", len(plan.kill))
        self.metrics.recovered("orphan_network", len(plan.networks))
        self.metrics.recovered("orphan_dir", len(plan.dirs))
        self.metrics.recovered("orphan_cgroup", len(plan.cgroups))
        self.metrics.recovered("lost_job", len(plan.fail_jobs))
        retention = self.settings.daemon.log_retention_days * 86400
        await asyncio.to_thread(self.logs.purge, retention)
        await self.store.forget_finished(time.time() - retention)
        return plan

    def _update_gauges(self) -> None:
        self.metrics.set_jobs(queued=len(self.queue), running=len(self.tasks))
        pool = self.engine.pool
        pooled = pool.held() + self.engine.hot.held()
        self.metrics.set_vms(max(0, len(self.engine.hypervisor.live) - pooled))
        for profile, idle in pool.idle_by_slot().items():
            self.metrics.set_pool_idle(profile, idle)
        self.metrics.set_capacity(self.total, self.used, self.settings.capacity.max_concurrency,
                                  len(self.tasks))
        if self.engine.gpus is not None:
            self.metrics.set_gpus(self.engine.gpus.stats())
