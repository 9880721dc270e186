"""Artifacts between GitLab and a job: dependencies' archives down, the job's up."""

from __future__ import annotations

import asyncio
import posixpath
import random
from pathlib import Path

from runner.errors import ForgeError, ForgeUnavailable
from runner.forge.gitlab.client import GitLabClient
from runner.forge.gitlab.payload import Artifact, Dependency, JobPayload
from runner.forge.gitlab.session import Backoff, Sleep, TraceStream


def artifact_filename(artifact: Artifact) -> str:
    """The upload's file name, as gitlab-runner names it: the artifact's name (its last
    path part; ``artifacts`` when unnamed) with the format's extension."""
    base = posixpath.basename(artifact.name.rstrip("/")) if artifact.name else "artifacts"
    if base in ("", "."):
        base = "default"
    extension = {"zip": ".zip", "gzip": ".gz"}.get(artifact.artifact_format or "zip", "")
    return base + extension


async def upload_artifact(
    client: GitLabClient,
    job: JobPayload,
    trace: TraceStream,
    artifact: Artifact,
    data: bytes,
    *,
    attempts: int = 3,
    backoff: Backoff | None = None,
    sleep: Sleep = asyncio.sleep,
    rng: random.Random | None = None,
) -> None:
    """Upload one artifacts archive as gitlab-runner does, saying so in the trace.

    ``artifact_type`` and ``artifact_format`` go to GitLab as the job's payload
    gave them. Network failures, 429 and 5xx are tried ``attempts`` times; then
    the last ``ForgeUnavailable`` is raised. A refusal (413 too large, 403,
    400) raises its ``ForgeError`` at once. Either way the trace says why.
    """
    backoff = backoff or Backoff()
    rng = rng or random.Random()
    kind = artifact.artifact_type or "archive"
    fmt = artifact.artifact_format or "zip"
    attempts = max(1, attempts)
    for attempt in range(1, attempts + 1):
        try:
            await client.upload_artifact(
                job.id, job.token, data, filename=artifact_filename(artifact),
                artifact_type=kind, artifact_format=fmt, expire_in=artifact.expire_in,
            )
        except ForgeUnavailable as exc:
            trace.write(f"WARNING: Uploading artifacts as \"{kind}\" to coordinator... failed"
                        f" (attempt {attempt} of {attempts}): {exc}\n".encode())
            if attempt == attempts:
                raise
            await sleep(backoff.delay(attempt, rng))
            continue
        except ForgeError as exc:
            reason = "too large archive" if exc.status == 413 else "refused"
            trace.write(f"ERROR: Uploading artifacts as \"{kind}\" to coordinator... {reason}"
                        f"  id={job.id} status={exc.status}: {exc}\n".encode())
            raise
        trace.write(
            f"Uploading artifacts as \"{kind}\" to coordinator... 201 Created"
            f"  id={job.id} bytes={len(data)}\n".encode()
        )
        return


async def download_dependencies(
    client: GitLabClient, job: JobPayload, trace: TraceStream, dest: Path
) -> list[tuple[Dependency, Path]]:
    """Download every dependency that has artifacts into ``dest``, saying so in the trace.

    Returns ``(dependency, archive path)`` pairs, in payload order. A failed
    download raises: the job cannot run without its inputs (a system failure
    if GitLab was unavailable, else the job's own).
    """
    saved: list[tuple[Dependency, Path]] = []
    for dep in job.dependencies:
        if dep.artifacts_file is None or not dep.artifacts_file.filename:
            continue
        trace.write(f"Downloading artifacts for {dep.name} ({dep.id})...\n".encode())
        path = dest / f"{dep.id}.zip"
        size = await client.download_artifacts(dep.id, dep.token, path)
        trace.write(f"Downloading artifacts from coordinator... ok  id={dep.id} bytes={size}\n"
                    .encode())
        saved.append((dep, path))
    return saved
