"""A runner VM queued before its JIT runner exists: the restore overlaps registration.

Both GitHub sources (webhooks and scale sets) start a runner the same way:
queue the VM's daemon job at once, with work that waits for the JIT config,
then register the runner while the VM restores. The VM runs the runner as
soon as both are done; with a hot clone, as soon as GitHub answers.

Every failure leaves nothing behind:

- registering fails or is cancelled: the VM's job is cancelled (queued,
  restoring or waiting for its config) and the error raised;
- the VM ends before GitHub answers (a failed restore, a shutdown): the new
  registration is removed at once and `PendingRunner.register` returns None;
- the VM ends later: the source removes a runner that took no job, as it
  does for any runner.

Until ``register`` returns, the start path owns the runner: a source's
job-ended handler leaves a runner that is still registering alone.

The JIT config lives in memory only: it reaches the guest as the runner
command's environment through the agent, never argv, a log line or the job's
stored record.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from runner.errors import SnapfleetError
from runner.execution import Command, Outcome, execute
from runner.forge.github.types import JitConfig, Register

if TYPE_CHECKING:
    from runner.secret import Secret
    from runner.service.jobs import JobSpec
    from runner.service.port import JobPort
    from runner.vm.backend import Machine

RUNNER_SCRIPT = "exec /usr/local/bin/snapfleet-github-runner"
JIT_ENV = "ACTIONS_RUNNER_INPUT_JITCONFIG"

Unregister = Callable[[JitConfig], Awaitable[None]]
"""Remove a registration nothing will run."""


class PendingRunner:
    """A runner VM's daemon job, queued and waiting for its JIT config."""

    def __init__(self, port: JobPort) -> None:
        self._port = port
        self._config: asyncio.Future[Secret] = asyncio.get_running_loop().create_future()
        self.job_id = ""

    @classmethod
    async def queue(cls, port: JobPort, spec: JobSpec, *, source: str) -> PendingRunner:
        """Queue the VM now: it restores while the runner is being registered."""
        pending = cls(port)
        job = await port.submit(spec, source=source, work=pending._work)
        pending.job_id = job.id
        return pending

    async def register(self, register: Register, *, unregister: Unregister
                       ) -> JitConfig | None:
        """Register the runner and hand its config to the VM.

        None when the VM ended before GitHub answered (the registration is
        removed again). If registering fails, the VM is cancelled and the
        error raised.
        """
        try:
            jit = await register()
        except BaseException as exc:
            await asyncio.shield(self._abandon(exc))
            raise
        if self._port.unfinished(self.job_id) is None:
            # Its VM is gone (a failed restore, a shutdown): nothing will run this runner.
            self._config.cancel()
            await unregister(jit)
            return None
        self._config.set_result(jit.encoded_jit_config)
        return jit

    async def _abandon(self, exc: BaseException) -> None:
        """Cancel the VM, saying why in its job's log and history."""
        why = "cancelled" if isinstance(exc, asyncio.CancelledError) else str(exc)
        try:
            await self._port.annotate(self.job_id, f"runner not registered ({why}): VM cancelled")
        finally:
            with contextlib.suppress(KeyError, SnapfleetError):  # it ended already
                await self._port.cancel(self.job_id)
            self._config.cancel()

    async def _work(self, machine: Machine, remaining: float) -> Outcome:
        """The VM's work: wait for the JIT config, then run the runner with it."""
        started = time.monotonic()
        jit = await self._config
        job_log = self._port.job_log(self.job_id)

        def sink(_stream: str, data: bytes) -> None:
            if job_log is not None:
                job_log.write(data)

        left = max(1.0, remaining - (time.monotonic() - started))
        command = Command(script=RUNNER_SCRIPT, env={JIT_ENV: jit.reveal()})
        return await execute(machine, command, sink, left)
