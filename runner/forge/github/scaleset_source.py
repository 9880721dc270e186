"""GitHub's runner scale sets as a job source: GitHub hands out the work, nothing listens.

``[github] mode = "scaleset"``. For each scope and each profile that serves
GitHub, a `ScaleSetListener` keeps this host's scale set (named per host, so
several hosts share the labels' jobs with GitHub as the only coordinator),
long-polls its message queue, acquires the jobs this host has room for and
starts one JIT runner VM per job. Capacity comes from the daemon
(`JobPort.free_slots`); listeners of one host share it under one lock, so two
never spend the same slot. At shutdown the listeners delete their sessions,
and runners that took no job are deregistered and their VMs cancelled; runners
busy with a job finish within the daemon's grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from runner.errors import ForgeError, SnapfleetError
from runner.forge.github import scaleset as proto
from runner.forge.github._http import RetryPolicy
from runner.forge.github.api import GitHubClient
from runner.forge.github.config import GitHubConfig
from runner.forge.github.health import ProfileHealth
from runner.forge.github.pending import RUNNER_SCRIPT, PendingRunner
from runner.forge.github.reconcile import runner_prefix
from runner.forge.github.scaleset_client import ActionsService, ScaleSetClient
from runner.forge.github.scaleset_listener import ListenerConfig, ScaleSetListener
from runner.forge.github.types import FORGE, JitConfig, Register, Scope
from runner.service.jobs import Job, JobSpec

if TYPE_CHECKING:
    from runner.service.port import JobPort

log = structlog.get_logger("snapfleet.github.scaleset")
CLEANUP_S = 10.0
"""Time allowed at shutdown for deregistering runners that took no job."""
CLOSE_S = ListenerConfig.close_timeout_s
"""Time a listener allows for deleting its session."""
RESTART = RetryPolicy(base_delay_s=2.0, max_delay_s=120.0)
"""Pauses before a listener that failed (GitHub down, bad credentials) starts again."""
_RNG = random.Random()


@dataclass
class _Runner:
    listener: ScaleSetListener
    name: str
    jit: JitConfig | None = None
    """None while its registration is in flight (its start path owns it until then)."""


class ScaleSetSource:
    """Runner scale-set listeners for every (scope, profile) this host serves."""

    name = "github-scaleset"
    requeue_on_restart = False  # a runner's JIT config lived in the old daemon's memory

    def __init__(
        self, config: GitHubConfig, port: JobPort, *, client: GitHubClient | None = None
    ) -> None:
        self.config = config
        self.port = port
        self._client = client
        self.host = config.host or socket.gethostname()
        self.health = ProfileHealth()
        self.listeners: list[ScaleSetListener] = []
        self.errors: dict[str, str] = {}
        """The last failure of each listener that is waiting to start again, by scale set."""
        self._scopes: dict[int, Scope] = {}  # by id() of the listener
        self._runners: dict[str, _Runner] = {}  # by daemon job id
        self._submitting = 0  # runners whose VM's job is being queued
        self._acquiring = asyncio.Lock()
        self._cleanups: set[asyncio.Task[None]] = set()
        port.subscribe(self._job_ended)

    # -- the JobSource -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        """Run one listener per scale set until shutdown; leave no session or idle
        runner of ours behind."""
        async with contextlib.AsyncExitStack() as stack:
            client = self._client
            if client is None:
                client = await stack.enter_async_context(GitHubClient.from_config(self.config))
            labels = {name: p.labels for name, p in self.port.settings.profiles.items()}
            for text in self.config.scopes:
                service = ActionsService(client, Scope.parse(text))
                stack.push_async_callback(service.close)
                for profile in self.config.scale_set_profiles(labels):
                    self.listeners.append(self._listener(ScaleSetClient(service), profile))
            tasks = [asyncio.create_task(self._serve(listener),
                                         name=f"scaleset-{listener.config.scale_set_name}")
                     for listener in self.listeners]
            try:
                yield
            finally:
                # Shutdown began: the listeners are closing their sessions and retiring
                # idle runners (each bounded in time); let them finish. When the daemon
                # failed instead, end them now (each still closes its session).
                if tasks and self.port.stopping.is_set():
                    await asyncio.wait(tasks, timeout=2 * CLEANUP_S + CLOSE_S)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if self._cleanups:
                    await asyncio.wait(self._cleanups, timeout=CLEANUP_S)
                    for task in self._cleanups:
                        task.cancel()

    def status(self) -> dict[str, Any]:
        scale_sets = {}
        for listener in self.listeners:
            entry = listener.status()
            scope = self._scopes[id(listener)]
            entry["scope"] = str(scope)
            entry["profile"] = listener.config.profile
            entry["error"] = self.errors.get(self._key(listener))
            scale_sets[self._key(listener)] = entry
        return {"github": {"mode": "scaleset", "scale_sets": scale_sets,
                           "runners": len(self._runners),
                           "unhealthy_profiles": self.health.unhealthy()}}

    # -- wiring one listener ---------------------------------------------------------------

    def _listener(self, client: ScaleSetClient, profile: str) -> ScaleSetListener:
        name = self.config.scale_set_name(profile, self.host)
        configured = self.config.scale_sets.get(profile)
        max_runners = (configured.max_runners if configured and configured.max_runners
                       else self.port.settings.capacity.max_concurrency)
        config = ListenerConfig(
            profile=profile, scale_set_name=name,
            labels=tuple(self.port.settings.profile(profile).labels),
            runner_group=self.config.runner_group, owner=self.host,
            runner_prefix=runner_prefix(self.config.runner_name_prefix, self.host),
            max_runners=max_runners,
        )
        scope = str(client.service.scope).replace("/", "_")
        state = self.port.settings.paths.state_dir / f"github-scalesets-{scope}.json"
        listener: ScaleSetListener | None = None

        def capacity() -> int:
            assert listener is not None
            return self._capacity(listener)

        async def start_runner(name: str, register: Register) -> JitConfig | None:
            assert listener is not None
            return await self._start_runner(listener, name, register)

        listener = ScaleSetListener(client, config, capacity=capacity, start_runner=start_runner,
                                    state_file=Path(state), health=self.health,
                                    acquire_lock=self._acquiring)
        self._scopes[id(listener)] = client.service.scope
        return listener

    def _key(self, listener: ScaleSetListener) -> str:
        """The scale set's name (with its scope when several scopes could share names)."""
        name = listener.config.scale_set_name
        return name if len(self.config.scopes) == 1 else f"{self._scopes[id(listener)]}:{name}"

    def _capacity(self, listener: ScaleSetListener) -> int:
        """Room for ``listener``: the daemon's free slots for its profile, less the jobs
        other listeners won and have no runner for yet (their VMs are not queued yet)."""
        owed = sum(max(0, other.intake.demand - other.intake.waiting)
                   for other in self.listeners if other is not listener)
        free = self.port.free_slots(listener.config.profile)
        return max(0, free - owed - self._submitting)

    async def _start_runner(self, listener: ScaleSetListener, name: str, register: Register
                            ) -> JitConfig | None:
        """Queue runner ``name``'s VM, then ``register`` it while the VM restores.

        The JIT config reaches the guest in memory only (see `pending`). None when the
        VM ended first (its registration is removed again); if registering fails, the
        VM is cancelled and the error raised.
        """
        spec = JobSpec(script=RUNNER_SCRIPT, profile=listener.config.profile,
                       name=f"github runner {name}")
        self._submitting += 1
        try:
            vm = await PendingRunner.queue(self.port, spec, source=self.name)
        finally:
            self._submitting -= 1
        runner = self._runners[vm.job_id] = _Runner(listener, name)

        async def unregister(jit: JitConfig) -> None:
            await listener.client.remove_runner(jit.runner_id)

        try:
            runner.jit = await vm.register(register, unregister=unregister)
        finally:
            if runner.jit is None:
                self._runners.pop(vm.job_id, None)
        return runner.jit

    def _job_ended(self, job: Job) -> None:
        """A runner VM ended (did it take a job?); any job ending may free room."""
        runner = self._runners.get(job.id) if job.source == self.name else None
        # One still registering is its start path's to settle (see `pending`).
        if runner is not None and runner.jit is not None:
            del self._runners[job.id]
            name = runner.name
            idle = runner.listener.intake.runners.get(name) is proto.RunnerState.WAITING
            runner.listener.runner_ended(name)
            if idle:
                # Its VM is gone, so it never will take a job: GitHub would list it as
                # an offline runner for good. (One that did run a job GitHub removes.)
                task = asyncio.get_running_loop().create_task(self._deregister(runner))
                self._cleanups.add(task)
                task.add_done_callback(self._cleanups.discard)
        for listener in self.listeners:
            listener.wake()

    async def _deregister(self, runner: _Runner) -> None:
        assert runner.jit is not None
        try:
            await runner.listener.client.remove_runner(runner.jit.runner_id)
        except SnapfleetError as exc:
            log.warning("could not remove the registration of a runner that took no job",
                        runner=runner.name, error=str(exc), forge=FORGE)

    # -- running a listener -------------------------------------------------------------

    async def _serve(self, listener: ScaleSetListener) -> None:
        """Run ``listener`` until shutdown, starting it again after failures."""
        stopping = self.port.stopping
        failures = 0
        name = self._key(listener)
        try:
            while not stopping.is_set():
                try:
                    await listener.run(stopping)
                    self.errors.pop(name, None)
                    break
                except SnapfleetError as exc:
                    self.errors[name] = str(exc)
                    hint = (" (another listener holds its session: each host needs its own"
                            " scale set name)" if isinstance(exc, ForgeError)
                            and exc.status == 409 else "")
                    log.warning("scale set listener failed; will start again",
                                scale_set=name, error=str(exc) + hint, forge=FORGE)
                except Exception as exc:
                    self.errors[name] = f"{type(exc).__name__}: {exc}"
                    log.exception("scale set listener crashed; will start again",
                                  scale_set=name)
                failures += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), RESTART.backoff(failures, _RNG))
        finally:
            await asyncio.shield(self._retire(listener))

    async def _retire(self, listener: ScaleSetListener) -> None:
        """Shutdown: deregister ``listener``'s runners that took no job, cancel their VMs.

        Runners busy with a job are left to finish (GitHub removes them after it).
        """
        idle = [(job_id, r.jit) for job_id, r in self._runners.items()
                if r.listener is listener and r.jit is not None
                and listener.intake.runners.get(r.name) is proto.RunnerState.WAITING]
        if not idle:
            return
        try:
            async with asyncio.timeout(CLEANUP_S):
                for job_id, jit in idle:
                    try:
                        await listener.client.remove_runner(jit.runner_id)
                    except ForgeError as exc:
                        # It took a job just now (GitHub refuses to remove a busy runner).
                        log.info("runner kept: it could not be removed", runner=jit.name,
                                 error=str(exc), forge=FORGE)
                        continue
                    self._runners.pop(job_id, None)  # deregistered already
                    listener.intake.runner_ended(jit.name)  # no news about its health
                    with contextlib.suppress(KeyError, SnapfleetError):
                        await self.port.cancel(job_id)
                    log.info("deleted unused runner at shutdown", runner=jit.name, forge=FORGE)
        except (TimeoutError, SnapfleetError) as exc:
            log.warning("could not delete every unused runner at shutdown",
                        error=str(exc) or "timed out", forge=FORGE)
