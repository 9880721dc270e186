"""The scale-set listener: one per profile, it turns GitHub's messages into runner VMs.

It gets or creates the profile's scale set, opens a message session (first
closing one a crashed run of ours left open, then retrying a 409 as GitHub's
client does), and loops: long-poll a message, acquire the offered jobs the
host has room for, acknowledge the message, start one JIT runner per job
assigned to the scale set that no runner has taken. At shutdown it stops
acquiring and starting at once and deletes its session (in bounded time).

The host is reached through two callbacks, so the daemon adapter stays thin:
``capacity()`` (how many more jobs this host can take for the profile) and
``start_runner(name, register)`` (queue a VM for runner ``name``, then call
``register()`` for its JIT config while the VM restores, see `pending`). The
adapter calls ``runner_ended(name)`` when that VM ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from runner.errors import ForgeAuthError, ForgeError, SnapfleetError
from runner.forge.github import scaleset as proto
from runner.forge.github._http import RetryPolicy, Sleep
from runner.forge.github.health import LIKELY_CAUSE, ProfileHealth
from runner.forge.github.scaleset_client import MessageSession, ScaleSetClient
from runner.forge.github.types import FORGE, JitConfig, Register
from runner.private_file import write_private

log = structlog.get_logger("snapfleet.github.scaleset")
_RNG = random.Random()

Capacity = Callable[[], int]
StartRunner = Callable[[str, Register], Awaitable[JitConfig | None]]
"""Queue runner ``name``'s VM, then register it; None if the VM ended first."""


@dataclass(frozen=True)
class ListenerConfig:
    """One profile's scale set and how its listener behaves."""

    profile: str
    scale_set_name: str
    labels: tuple[str, ...]
    runner_group: str = "default"
    owner: str = "snapfleet"
    """Session owner (this host's name); shown by GitHub."""
    runner_prefix: str = "snapfleet-"
    max_runners: int = 10
    conflict_retry_s: float = 30.0
    conflict_attempts: int = 10
    """A 409 on session create is retried this often (GitHub's listener: 10 x 30 s)."""
    close_timeout_s: float = 10.0
    errors: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(base_delay_s=1.0, max_delay_s=60.0)
    )
    """Pauses after failed polls (exponential, capped; the loop never gives up)."""


class ScaleSetListener:
    """Listens on one scale set and starts runners within the host's capacity."""

    def __init__(
        self,
        client: ScaleSetClient,
        config: ListenerConfig,
        *,
        capacity: Capacity,
        start_runner: StartRunner,
        state_file: Path | None = None,
        health: ProfileHealth | None = None,
        sleep: Sleep = asyncio.sleep,
        acquire_lock: asyncio.Lock | None = None,
    ) -> None:
        self.client = client
        self.config = config
        self._capacity = capacity
        self._start_runner = start_runner
        self._state_file = state_file
        self.health = health or ProfileHealth()
        self._sleep = sleep
        self._acquiring = acquire_lock or asyncio.Lock()
        """Held from reading capacity to recording what was won; listeners sharing a
        host share it, so two never spend the same free slot."""
        self.intake = proto.Intake(max_runners=config.max_runners)
        self.scale_set: proto.ScaleSet | None = None
        self.session: MessageSession | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self.acquired_total = 0
        self.started_total = 0

    # -- what the adapter calls ----------------------------------------------------

    def runner_ended(self, name: str) -> None:
        """The VM of runner ``name`` ended; one that never took a job earns a backoff."""
        if name not in self.intake.runners:
            return
        if self.intake.runner_ended(name):
            self.health.succeeded(self.config.profile)
        else:
            delay = self.health.failed(self.config.profile)
            log.warning("runner ended without a job; backing off", runner=name,
                        profile=self.config.profile, pause_s=delay, cause=LIKELY_CAUSE,
                        forge=FORGE)
        self._wake.set()

    def wake(self) -> None:
        """Capacity may have freed: reconsider starting runners now."""
        self._wake.set()

    def status(self) -> dict[str, Any]:
        """The scale set, its statistics and our runners, for `snapfleet status`."""
        stats = self.intake.statistics
        return {
            "scale_set": self.scale_set.name if self.scale_set else self.config.scale_set_name,
            "scale_set_id": self.scale_set.id if self.scale_set else None,
            "session": self.session is not None and self.session.session is not None,
            "assigned": self.intake.demand,
            "runners": len(self.intake.runners),
            "acquired_total": self.acquired_total,
            "statistics": stats.to_json(),
            "unhealthy": self.health.unhealthy().get(self.config.profile),
        }

    # -- the loop ------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Serve until ``stopping`` is set, then delete the session and return."""
        self.scale_set = await self._ensure_scale_set()
        self.session = MessageSession(self.client.service, self.scale_set.id, self.config.owner)
        opened = await self._open_session(self.session)
        self.intake.resume(opened.statistics)
        log.info("scale set session open", scale_set=self.scale_set.name,
                 scale_set_id=self.scale_set.id, profile=self.config.profile,
                 statistics=opened.statistics.to_json(), forge=FORGE)
        try:
            await self._serve(self.session, stopping)
        finally:
            self._stopping = True
            await asyncio.shield(self._close(self.session))

    async def _ensure_scale_set(self) -> proto.ScaleSet:
        group = await self.client.runner_group_id(self.config.runner_group)
        return await self.client.ensure_scale_set(
            self.config.scale_set_name, group, self.config.labels
        )

    async def _open_session(self, session: MessageSession) -> proto.Session:
        stale = self._recorded_session()
        if stale is not None:
            # Ours, left open by a run that crashed: close it rather than wait it out.
            log.info("deleting the session a previous run left open", session=stale)
            await session.delete(stale)
        for attempt in range(1, self.config.conflict_attempts + 1):
            try:
                opened = await session.create()
            except ForgeError as exc:
                if exc.status != 409 or attempt == self.config.conflict_attempts:
                    raise
                log.info("scale set has an open session (another listener?); retrying",
                         attempt=attempt, error=str(exc))
                await self._sleep(self.config.conflict_retry_s)
                continue
            self._record_session(opened.id)
            return opened
        raise AssertionError("unreachable")  # pragma: no cover

    async def _serve(self, session: MessageSession, stopping: asyncio.Event) -> None:
        failures = 0
        poll: asyncio.Task[proto.Batch | None] | None = None
        stop = asyncio.ensure_future(stopping.wait())
        try:
            while not stopping.is_set():
                await self._start_runners()
                if poll is None:
                    poll = asyncio.create_task(
                        session.get_message(self.intake.last_message_id, self._max_capacity())
                    )
                wake = asyncio.ensure_future(self._wake.wait())
                # A profile in backoff with jobs waiting: look again when the pause ends.
                pause = self.health.wait_s(self.config.profile) if self.intake.demand else 0.0
                await asyncio.wait({poll, stop, wake}, timeout=pause or None,
                                   return_when=asyncio.FIRST_COMPLETED)
                wake.cancel()
                self._wake.clear()
                if stopping.is_set() or not poll.done():
                    continue
                done, poll = poll, None
                try:
                    batch = done.result()
                    if batch is not None:
                        await self._handle(session, batch)
                    failures = 0
                except SnapfleetError as exc:
                    failures += 1
                    await self._recover(session, exc, failures)
        finally:
            stop.cancel()
            if poll is not None:
                poll.cancel()
                with contextlib.suppress(asyncio.CancelledError, SnapfleetError):
                    await poll

    async def _handle(self, session: MessageSession, batch: proto.Batch) -> None:
        """Acquire within capacity, acknowledge, then start runners for assigned jobs.

        A failed acquire leaves the message unacknowledged: the queue hands it
        out again, and offers are only ever acquired once.
        """
        if self.intake.receive(batch):
            async with self._acquiring:
                wanted = self.intake.to_acquire(self._free())
                if wanted and not self._stopping:
                    won = await session.acquire(wanted)
                    self.intake.acquired(wanted, won)
                    self.acquired_total += len(set(won) & set(wanted))
                    log.info("acquired jobs", asked=len(wanted), won=len(won),
                             scale_set=session.scale_set_id, forge=FORGE)
        await session.delete_message(batch.message_id)

    async def _recover(self, session: MessageSession, exc: SnapfleetError, failures: int) -> None:
        delay = self.config.errors.backoff(failures, _RNG)
        log.warning("scale set poll failed; will retry", error=str(exc), pause_s=round(delay, 2),
                    forge=FORGE)
        await self._sleep(delay)
        if isinstance(exc, ForgeAuthError) or (isinstance(exc, ForgeError) and exc.status == 404):
            # The session could not be refreshed: open a new one (our cursor stays).
            with contextlib.suppress(SnapfleetError):
                await session.delete()
            opened = await session.create()
            self._record_session(opened.id)

    def _free(self) -> int:
        if self._stopping:
            return 0
        return max(0, self._capacity())

    def _max_capacity(self) -> int:
        """What we tell the queue we could run in all (``X-ScaleSetMaxCapacity``)."""
        return min(self.config.max_runners, len(self.intake.runners) + self._free())

    async def _start_runners(self) -> None:
        """One JIT runner per assigned job without one, within capacity and backoff."""
        profile = self.config.profile
        while not self._stopping and self.intake.to_start(self._free()) > 0:
            if self.health.wait_s(profile) > 0:
                return  # the loop looks again when the pause ends
            try:
                await self._start_one()
            except SnapfleetError as exc:
                # Retried on the next message or wake-up, not in a loop here.
                log.warning("could not start a runner", profile=profile, error=str(exc),
                            forge=FORGE)
                return

    async def _start_one(self) -> None:
        """Start one runner: its VM restores while GitHub registers it."""
        assert self.scale_set is not None
        scale_set_id = self.scale_set.id
        name = f"{self.config.runner_prefix}{secrets.token_hex(4)}"

        async def register() -> JitConfig:
            return await self.client.generate_jitconfig(scale_set_id, name)

        self.intake.runner_started(name)  # supply from now on: one runner per job
        try:
            jit = await self._start_runner(name, register)
        except BaseException:
            # Nothing registered and its VM cancelled: no news about the profile's health.
            self.intake.runner_ended(name)
            raise
        if jit is None:
            self.runner_ended(name)  # its VM ended before GitHub answered: back off
            return
        self.started_total += 1
        log.info("runner started", runner=jit.name, profile=self.config.profile,
                 scale_set=self.scale_set.name, forge=FORGE)

    async def _close(self, session: MessageSession) -> None:
        if session.session is None:
            return
        try:
            async with asyncio.timeout(self.config.close_timeout_s):
                await session.delete()
            self._record_session(None)
            log.info("scale set session closed", scale_set=session.scale_set_id, forge=FORGE)
        except (SnapfleetError, TimeoutError) as exc:
            log.warning("could not delete the scale set session; the next start will",
                        error=str(exc) or "timed out", forge=FORGE)

    # -- the session id, kept on disk so a crashed run's session can be closed -------

    def _recorded_session(self) -> str | None:
        if self._state_file is None or self.scale_set is None:
            return None
        try:
            data = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return None
        entry = data.get(str(self.scale_set.id)) if isinstance(data, dict) else None
        return entry if isinstance(entry, str) else None

    def _record_session(self, session_id: str | None) -> None:
        if self._state_file is None or self.scale_set is None:
            return
        try:
            data = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        if session_id is None:
            data.pop(str(self.scale_set.id), None)
        else:
            data[str(self.scale_set.id)] = session_id
        write_private(self._state_file, json.dumps(data))  # session ids: nobody else's business


def listeners_status(listeners: Sequence[ScaleSetListener]) -> dict[str, Any]:
    """Status of several listeners, by profile."""
    return {listener.config.profile: listener.status() for listener in listeners}

