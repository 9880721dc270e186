"""Artifacts between GitLab and a job: dependencies' archives down, the job's up."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from runner.errors import ForgeError, ForgeUnavailable
from runner.forge.gitlab.client import GitLabClient
from runner.forge.gitlab.payload import Artifact, Dependency, JobPayload
from runner.forge.gitlab.session import Backoff, Sleep, TraceStream


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
) -> bool:
    """Upload one artifacts archive as gitlab-runner does, saying so in the trace.

    Retries network failures, 429 and 5xx ``attempts`` times; returns whether
    GitLab took it. A refusal (too large, forbidden) is a note in the trace.
    """
    backoff = backoff or Backoff()
    rng = rng or random.Random()
    kind = artifact.artifact_type or "archive"
    filename = f"{artifact.name or 'artifacts'}.zip"
    for attempt in range(1, attempts + 1):
        try:
            await client.upload_artifact(
                job.id, job.token, data, filename=filename, artifact_type=kind,
                artifact_format=artifact.artifact_format or "zip", expire_in=artifact.expire_in,
            )
        except ForgeUnavailable as exc:
            trace.write(f"WARNING: Uploading artifacts as \"{kind}\" failed: {exc}\n".encode())
            if attempt < attempts:
                await sleep(backoff.delay(attempt, rng))
            continue
        except ForgeError as exc:
            trace.write(f"ERROR: Uploading artifacts as \"{kind}\" refused: {exc}\n".encode())
            return False
        trace.write(
            f"Uploading artifacts as \"{kind}\" to coordinator... 201 Created"
            f"  id={job.id} bytes={len(data)}\n".encode()
        )
        return True
    return False


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
