"""Jobs: what a submitter asks for, and the lifecycle a job goes through."""

from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runner.errors import ConfigError, InvalidStateError
from runner.limits import Env, Text, Timeout, check_fits_agent
from runner.secret import Secret


class JobState(enum.StrEnum):
    QUEUED = "queued"
    STARTING = "starting"  # capacity reserved, VM being restored
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the job's own command failed
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    SYSTEM_FAILURE = "system_failure"  # Snapfleet or the VM failed, not the job

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.TIMED_OUT, JobState.CANCELLED,
     JobState.SYSTEM_FAILURE}
)
_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.STARTING, JobState.CANCELLED, JobState.SYSTEM_FAILURE}),
    JobState.STARTING: frozenset(
        {JobState.RUNNING, JobState.CANCELLED, JobState.TIMED_OUT, JobState.SYSTEM_FAILURE}
    ),
    JobState.RUNNING: frozenset(TERMINAL),
    **{state: frozenset() for state in TERMINAL},
}


def check_transition(job_id: str, old: JobState, new: JobState) -> None:
    """Raise InvalidStateError unless the table allows ``old`` → ``new``."""
    if new not in _TRANSITIONS[old]:
        raise InvalidStateError(f"move job {job_id} to {new}", str(old))


class _Checked(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls, data: Any) -> Self:
        """Validate what was submitted; ConfigError naming every bad field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = [(_where(err["loc"]), err["msg"]) for err in exc.errors()]
            raise ConfigError(problems[0][0], problems[0][1], problems=problems) from None


def _where(loc: tuple[int | str, ...]) -> str:
    # A bad env key is part of the location: keep a NUL in it out of messages.
    return ".".join(str(p) for p in loc).replace("\x00", "\\0") or "job"


class JobSpec(_Checked):
    """A job as submitted: `snapfleet submit job.toml` or the API's POST /v1/jobs.

    Every field is checked here (see `runner.limits`), so a job the guest agent
    could not carry or start is refused before a VM is restored.
    """

    name: Annotated[Text, Field(max_length=200)] | None = None
    script: Text | None = None
    """Shell script run by /bin/sh in the guest."""
    command: list[Text] | None = None
    """Or an argv to run directly."""
    env: Env = Field(default_factory=dict)
    """Plain environment: stored with the job until it ends (secrets go in ``secret_env``
    of the submission, never here)."""
    workdir: Text | None = None
    profile: Text | None = None
    """VM profile; unset = chosen by labels, else the default profile."""
    labels: list[Text] = Field(default_factory=list)
    timeout_s: Timeout | None = None
    """Wall-clock limit; unset = the profile's."""

    @model_validator(mode="after")
    def _one_thing_to_run(self) -> JobSpec:
        if (self.script is None) == (self.command is None):
            raise ValueError("give exactly one of `script` or `command`")
        if self.command is not None and not self.command:
            raise ValueError("`command` must not be empty")
        check_fits_agent(argv=self.command, script=self.script, env=self.env, cwd=self.workdir)
        return self


class ExecRequest(_Checked):
    """A script to run in a leased VM (a GitLab custom-executor stage)."""

    script: Text
    env: Env | None = None
    cwd: Text | None = None
    stage: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    """The custom executor's stage name (``build_script``, ``after_script``...)."""

    @model_validator(mode="after")
    def _fits(self) -> ExecRequest:
        check_fits_agent(script=self.script, env=self.env, cwd=self.cwd)
        return self


class _SecretEnv(_Checked):
    # Checked like `JobSpec.env`; pydantic's messages name the key, never the value.
    secret_env: Env = Field(default_factory=dict)


def parse_submission(data: Any) -> tuple[JobSpec, dict[str, Secret]]:
    """A submitted job (POST /v1/jobs): the spec, and its ``secret_env`` split off.

    ``secret_env`` values are kept in memory only; the spec is what the store keeps.
    ConfigError names every bad field, never a secret value.
    """
    raw: Any = None
    if isinstance(data, dict) and "secret_env" in data:
        data = dict(data)
        raw = data.pop("secret_env")
    problems: list[tuple[str, str]] = []
    spec: JobSpec | None = None
    secret_env: dict[str, str] = {}
    try:
        spec = JobSpec.parse(data)
    except ConfigError as exc:
        problems += exc.problems
    if raw is not None:
        try:
            secret_env = _SecretEnv.parse({"secret_env": raw}).secret_env
        except ConfigError as exc:
            problems += exc.problems
    if spec is not None:
        for key in sorted(secret_env.keys() & spec.env.keys()):
            problems.append((f"secret_env.{key}", "also given in `env`; give it in one of them"))
        try:
            check_fits_agent(argv=spec.command, script=spec.script,
                             env={**spec.env, **secret_env}, cwd=spec.workdir)
        except ValueError as exc:
            problems.append(("secret_env", str(exc)))
    if problems or spec is None:
        raise ConfigError(problems[0][0], problems[0][1], problems=problems)
    return spec, {key: Secret(value) for key, value in secret_env.items()}


def new_job_id() -> str:
    return secrets.token_hex(5)


@dataclass
class Job:
    """A job's record, as the store keeps it (secrets in ``spec.env`` never leave the host)."""

    id: str
    spec: JobSpec
    profile: str
    source: str = "local"
    state: JobState = JobState.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    reason: str | None = None
    vm_id: str | None = None
    log_bytes: int = 0
    secret_env: dict[str, Secret] = field(default_factory=dict, repr=False)
    """Environment that exists only in this process's memory (e.g. a runner's JIT
    config): never stored, shown or logged, handed to the guest over the agent."""
    secret_keys: tuple[str, ...] = ()
    """Names of the secret environment: stored, so a restarted daemon knows what it lost."""
    env_keys: tuple[str, ...] = ()
    """Names of the plain environment: stored, kept after the job ends (the values are not)."""
    spec_problem: str | None = None
    """Why the stored spec no longer passes today's checks (stored by an older version):
    such a job can still be listed, but a queued one must not run."""

    def __post_init__(self) -> None:
        self.secret_keys = self.secret_keys or tuple(sorted(self.secret_env))
        self.env_keys = self.env_keys or tuple(sorted(self.spec.env))

    @property
    def secrets_lost(self) -> tuple[str, ...]:
        """Secret names whose values this process does not hold (a restart took them)."""
        return tuple(k for k in self.secret_keys if k not in self.secret_env)

    def environment(self) -> dict[str, str]:
        """The job's full environment, secrets revealed: only for handing to the guest."""
        return {**self.spec.env, **{k: v.reveal() for k, v in self.secret_env.items()}}

    def public(self) -> dict[str, Any]:
        """What the API shows: everything but the environment's values."""
        return {
            "id": self.id,
            "name": self.spec.name,
            "profile": self.profile,
            "source": self.source,
            "state": str(self.state),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "timeout_s": self.spec.timeout_s,  # None: the profile's
            "vm_id": self.vm_id,
            "log_bytes": self.log_bytes,
            "env_keys": list(self.env_keys),
            "secret_env_keys": list(self.secret_keys),
        }
