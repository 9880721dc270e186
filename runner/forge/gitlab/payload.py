"""The job GitLab hands a runner from ``POST /api/v4/jobs/request`` (HTTP 201).

Field names and meanings follow gitlab-runner's ``common/network.go``
(``JobResponse`` and its parts). Unknown fields are ignored, as a runner must
accept what newer GitLab versions add; ``null`` anywhere reads as the
field's zero value (empty, ``false``, ``0``), as gitlab-runner's Go decoder
reads it. A payload we cannot use raises `JobPayloadError` with a
one-line reason and, when they could be read, the job's id and token so the
caller can still report the job failed.

Secrets (the job token, dependency tokens, variable values) never show in a
``repr``: tokens are `Secret`, variable values are excluded from ``repr``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
)

from runner.errors import JobPayloadError
from runner.secret import Secret

FORGE = "gitlab"


def _null_as(zero: Callable[[], object]) -> BeforeValidator:
    """``null`` read as the type's zero value (``zero()``), as Go's JSON decoder reads it."""
    return BeforeValidator(lambda value: zero() if value is None else value)


def _to_secret(value: object) -> object:
    if isinstance(value, Secret):
        return value
    if value is None:
        return Secret("")
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return Secret(value)


List = Annotated[list[str], _null_as(list)]
Str = Annotated[str, _null_as(str)]
Bool = Annotated[bool, _null_as(bool)]
Int = Annotated[int, _null_as(int)]
SecretStr = Annotated[
    Secret,
    BeforeValidator(_to_secret),
    PlainSerializer(lambda s: s.reveal(), return_type=str),
    WithJsonSchema({"type": "string"}),
]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="ignore", frozen=True, arbitrary_types_allowed=True, populate_by_name=True
    )


class When(StrEnum):
    """When a step, artifact or cache applies, given how the job has gone so far."""

    ON_SUCCESS = "on_success"
    ON_FAILURE = "on_failure"
    ALWAYS = "always"

    def applies(self, failed: bool) -> bool:
        """Whether this applies to a job that has (``failed``) or has not failed."""
        if self is When.ALWAYS:
            return True
        return failed if self is When.ON_FAILURE else not failed


def _when(value: object) -> object:
    return When.ON_SUCCESS if value in (None, "") else value


WhenField = Annotated[When, BeforeValidator(_when)]


class Variable(_Model):
    """One job variable (``JobVariable``). ``value`` is left out of ``repr``."""

    key: str = Field(min_length=1)
    value: Str = Field(default="", repr=False)
    public: Bool = True
    masked: Bool = False
    file: Bool = False
    raw: Bool = False


class GitInfo(_Model):
    """Where the job's source is (``GitInfo``). ``repo_url`` carries the job token."""

    repo_url: Str = Field(default="", repr=False)
    repo_object_format: Str = ""
    ref: Str = ""
    sha: Str = ""
    before_sha: Str = ""
    ref_type: Str = ""
    refspecs: List = Field(default_factory=list)
    depth: Int = 0


class Step(_Model):
    """One step (``Step``): ``script`` is shell lines, ``timeout`` seconds."""

    name: str = Field(min_length=1)
    script: List = Field(default_factory=list)
    timeout: Int = Field(default=3600, ge=0)
    when: WhenField = When.ON_SUCCESS
    allow_failure: Bool = False


class Hook(_Model):
    """A job hook (``Hook``): ``pre_get_sources_script`` runs before the fetch,
    ``post_get_sources_script`` after the checkout (and submodules)."""

    name: Str = ""
    script: List = Field(default_factory=list)


class Image(_Model):
    """A container image (``Image``); only its presence matters to a VM runner."""

    name: Str = ""
    alias: Str = ""
    entrypoint: List = Field(default_factory=list)
    command: List = Field(default_factory=list)


class Artifact(_Model):
    """What to upload after the job (``Artifact``)."""

    name: Str = ""
    untracked: Bool = False
    paths: List = Field(default_factory=list)
    exclude: List = Field(default_factory=list)
    when: WhenField = When.ON_SUCCESS
    artifact_type: Str = Field(default="archive", alias="artifact_type")
    artifact_format: Str = "zip"
    expire_in: Str = ""


class Cache(_Model):
    """A cache definition (``Cache``)."""

    key: Str = ""
    untracked: Bool = False
    policy: Str = ""
    paths: List = Field(default_factory=list)
    when: WhenField = When.ON_SUCCESS
    fallback_keys: List = Field(default_factory=list)


class ArtifactsFile(_Model):
    """A dependency's artifacts archive (``DependencyArtifactsFile``)."""

    filename: Str = ""
    size: Int = 0


class Dependency(_Model):
    """An earlier job whose artifacts this job downloads (``Dependency``)."""

    id: Int
    name: Str = ""
    token: SecretStr = Field(default_factory=lambda: Secret(""))
    artifacts_file: ArtifactsFile | None = None


DEFAULT_TIMEOUT_S = 7200
"""gitlab-runner's job timeout when GitLab sends none (``runner_info.timeout`` 0)."""


class RunnerInfo(_Model):
    """``RunnerInfo``: ``timeout`` is the job's timeout in seconds (0: `DEFAULT_TIMEOUT_S`)."""

    timeout: Int = Field(default=0, ge=0)


class JobInfo(_Model):
    """``JobInfo``: names for logs."""

    name: Str = ""
    stage: Str = ""
    project_id: Int = 0
    project_name: Str = ""


class GitLabFeatures(_Model):
    """What GitLab says it supports (``GitlabFeatures``)."""

    trace_sections: Bool = False
    token_mask_prefixes: List = Field(default_factory=list)
    failure_reasons: List = Field(default_factory=list)


def _nonempty_image(value: object) -> object:
    if value is None or (isinstance(value, Mapping) and not value.get("name")):
        return None
    return value


class JobPayload(_Model):
    """A job as ``POST /api/v4/jobs/request`` returns it (``JobResponse``)."""

    id: Int = Field(gt=0)
    token: SecretStr
    allow_git_fetch: Bool = False
    job_info: Annotated[JobInfo, _null_as(dict)] = Field(default_factory=JobInfo)
    git_info: Annotated[GitInfo, _null_as(dict)] = Field(default_factory=GitInfo)
    runner_info: Annotated[RunnerInfo, _null_as(dict)] = Field(
        default_factory=RunnerInfo
    )
    variables: Annotated[list[Variable], _null_as(list)] = Field(
        default_factory=list, repr=False
    )
    steps: Annotated[list[Step], _null_as(list)] = Field(default_factory=list)
    image: Annotated[Image | None, BeforeValidator(_nonempty_image)] = None
    services: Annotated[list[Image], _null_as(list)] = Field(default_factory=list)
    artifacts: Annotated[list[Artifact], _null_as(list)] = Field(
        default_factory=list
    )
    cache: Annotated[list[Cache], _null_as(list)] = Field(default_factory=list)
    dependencies: Annotated[list[Dependency], _null_as(list)] = Field(
        default_factory=list
    )
    features: Annotated[GitLabFeatures, _null_as(dict)] = Field(
        default_factory=GitLabFeatures
    )
    hooks: Annotated[list[Hook], _null_as(list)] = Field(default_factory=list)
    run: Str = Field(default="", repr=False)
    """GitLab Steps (the ``run`` keyword) as JSON text; a VM runner without step-runner
    refuses such a job (see `runner.forge.gitlab.script.unsupported_reason`)."""

    @classmethod
    def parse(cls, raw: bytes | str | Mapping[str, Any]) -> JobPayload:
        """Validate a job payload (JSON text or decoded) or raise `JobPayloadError`."""
        data: object = raw
        if isinstance(raw, bytes | str):
            try:
                data = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise JobPayloadError("job payload is not JSON", forge=FORGE) from exc
        if not isinstance(data, Mapping):
            raise JobPayloadError("job payload is not a JSON object", forge=FORGE)
        try:
            job = cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "payload"
            job_id = data.get("id")
            token = data.get("token")
            raise JobPayloadError(
                f"job payload: {where}: {err['msg']} ({exc.error_count()} problem(s))",
                forge=FORGE,
                job_id=job_id if isinstance(job_id, int) and job_id > 0 else None,
                job_token=Secret(token) if isinstance(token, str) and token else None,
            ) from None
        if not job.token.reveal():
            raise JobPayloadError("job payload: token: empty", forge=FORGE, job_id=job.id)
        return job

    # -- views the script builder and the runner use -------------------------

    def hook(self, name: str) -> list[str]:
        """The script lines of the hooks called ``name``, in payload order."""
        return [line for hook in self.hooks if hook.name == name for line in hook.script]

    def variable(self, key: str) -> str | None:
        """The value of variable ``key`` (the last one sent wins), or ``None``."""
        for var in reversed(self.variables):
            if var.key == key:
                return var.value
        return None

    def masked_values(self) -> list[str]:
        """Every value that must never reach the trace: masked variables and tokens."""
        values = [v.value for v in self.variables if v.masked and v.value]
        values.append(self.token.reveal())
        values.extend(d.token.reveal() for d in self.dependencies if d.token.reveal())
        return values

    @property
    def timeout_s(self) -> int:
        """The job's own timeout (``runner_info.timeout``, else `DEFAULT_TIMEOUT_S`), in seconds."""
        return self.runner_info.timeout or DEFAULT_TIMEOUT_S
