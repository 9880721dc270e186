"""One exception tree for Snapfleet, shaped by what the caller can do.

* ``ConfigError``: the operator must fix configuration or input; retrying is futile.
* ``HostError``: the host lacks something (QEMU, /dev/net/tun, root); fix the host.
* ``ImageError`` / ``SnapshotError``: artifacts are missing or do not match; rebuild them.
* ``VMError`` and subclasses: one VM failed; the job is a *system* failure, the
  daemon carries on, and the VM's resources have been (or must be) reclaimed.
* ``AgentError``: the guest agent misbehaved or went away; a system failure too.
* ``NetworkError``: a namespace, tap or NAT rule could not be set up or removed.
* ``ForgeError``: a forge request was refused; ``ForgeAuthError``: fix credentials;
  ``ForgeUnavailable``: retry later; ``WebhookError``: a bad delivery (answer 4xx).

``SnapfleetError`` and ``ConfigError`` are defined in `runner.error_root` (so the
CLI's quick commands can raise them without importing the agent protocol) and
re-exported here.

Third-party exceptions are translated at the adapter that calls them and are
chained with ``raise ... from exc``; they never leak past the adapter.
"""

from __future__ import annotations

from runner.agent import protocol as _agent_protocol
from runner.error_root import ConfigError as ConfigError
from runner.error_root import SnapfleetError as SnapfleetError


class HostError(SnapfleetError):
    """The host cannot do what was asked (missing tool, device, privilege)."""


class ImageError(SnapfleetError):
    """A guest image is missing, corrupt, or failed to build."""


class SnapshotError(SnapfleetError):
    """A snapshot is missing, corrupt, or cannot be taken."""


class SnapshotMismatch(SnapshotError):
    """A snapshot was made for a different VMM or device layout than this one."""

    def __init__(self, field: str, expected: object, actual: object) -> None:
        super().__init__(
            f"snapshot was made with {field}={expected!r}, this host has {actual!r};"
            " recreate it with `snapfleet snapshot create`"
        )
        self.field = field
        self.expected = expected
        self.actual = actual


class VMError(SnapfleetError):
    """Something went wrong with one VM. The job it ran is a system failure."""

    def __init__(self, message: str, *, vm_id: str | None = None) -> None:
        super().__init__(f"vm {vm_id}: {message}" if vm_id else message)
        self.vm_id = vm_id


class RestoreError(VMError):
    """Restoring a clone from a snapshot failed; what it built was torn down."""


class VMDied(VMError):
    """The VMM process exited while the VM was in use."""

    def __init__(self, message: str, *, vm_id: str | None = None, returncode: int | None = None):
        super().__init__(message, vm_id=vm_id)
        self.returncode = returncode


class GuestEnded(VMError):
    """The guest kernel panicked, rebooted, powered off or halted while in use.

    ``how`` is one of "panicked", "rebooted", "powered off", "halted";
    ``console`` holds the last lines of the guest's console, for the job log.
    """

    def __init__(self, message: str, *, vm_id: str | None = None, how: str, console: str):
        super().__init__(message, vm_id=vm_id)
        self.how = how
        self.console = console


class InvalidStateError(VMError):
    """An operation was called in a lifecycle state that does not allow it."""

    def __init__(self, operation: str, state: str, *, vm_id: str | None = None) -> None:
        super().__init__(f"cannot {operation} in state {state}", vm_id=vm_id)
        self.operation = operation
        self.state = state


class AgentError(SnapfleetError):
    """The guest agent failed, answered nonsense, or went away."""


class AgentProtocolError(AgentError, _agent_protocol.AgentProtocolError):
    """A frame or message violated the agent protocol.

    Also a `runner.agent.protocol.AgentProtocolError` (which the stdlib-only
    agent defines for itself), so one ``except`` catches what the pure
    protocol core raises and what the host-side client raises. ``reason`` and
    ``message_id`` come from that base.
    """


class AgentTimeout(AgentError):
    """The guest agent did not answer in time."""


class AgentDisconnected(AgentError):
    """The channel to the guest agent closed (usually: the VM died)."""


class NetworkError(SnapfleetError):
    """A network namespace, tap, veth or NAT rule could not be managed."""


class ForgeError(SnapfleetError):
    """A forge (GitHub, GitLab) refused a request or answered nonsense.

    Retrying the same request will fail the same way (404, 409, 422, a
    response of the wrong shape); the loop logs it and moves on. ``forge``
    names the forge, ``status`` is the HTTP status when there was one.
    Messages never carry tokens, JIT configs or request bodies.
    """

    def __init__(self, message: str, *, forge: str, status: int | None = None) -> None:
        super().__init__(f"{forge}: {message}")
        self.forge = forge
        self.status = status


class ForgeAuthError(ForgeError):
    """The forge rejected our credentials or permissions (401, 403).

    The operator must fix the token, App key, installation or its permissions.
    """


class ForgeUnavailable(ForgeError):
    """The forge is down, unreachable or rate-limiting us: try again later.

    ``retry_after`` is the number of seconds the forge asked us to wait, when
    it said (rate limits), else ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        forge: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, forge=forge, status=status)
        self.retry_after = retry_after


class WebhookError(ForgeError):
    """A webhook delivery is malformed: answer 400. ``field`` names what was wrong."""

    def __init__(self, message: str, *, forge: str, field: str | None = None) -> None:
        super().__init__(message, forge=forge)
        self.field = field


class WebhookSignatureError(WebhookError):
    """A webhook delivery's signature is missing, malformed or wrong: answer 401."""


class Draining(SnapfleetError):
    """The daemon is shutting down and takes no new jobs."""


class GpuError(SnapfleetError):
    """A GPU could not be handed out, prepared or given back.

    ``device`` is the PCI address (or test device id) concerned, when there is one.
    A job that hits it is a system failure; the device is back in the pool or
    quarantined, never left half-bound.
    """

    def __init__(self, message: str, *, device: str | None = None) -> None:
        super().__init__(f"gpu {device}: {message}" if device else message)
        self.device = device


class GpuUnavailable(GpuError):
    """No free, healthy device matches the request right now."""


class GpuBindError(GpuError):
    """A device could not be taken from the host for a VM; what was changed is undone."""


class GpuReleaseError(GpuError):
    """A device could not be reset or given back to its host driver: it is quarantined."""


class JobPayloadError(ForgeError):
    """A job the forge handed us is malformed: it cannot be run, only failed.

    ``job_id`` and ``job_token`` are set when they could still be read, so the
    caller can report the job failed instead of leaving it running forever.
    ``job_token`` is a `runner.secret.Secret`; the message never carries it.
    """

    def __init__(
        self, message: str, *, forge: str, job_id: int | None = None, job_token: object = None
    ) -> None:
        super().__init__(message, forge=forge)
        self.job_id = job_id
        self.job_token = job_token
