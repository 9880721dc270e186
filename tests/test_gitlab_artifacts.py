"""A GitLab job's artifacts, from its script to GitLab: formats, refusals, slow uploads.

The job runs as `GuestRun.work` does it in the daemon: the generated script runs
for real under bash on the toy VM backend (a host shell, no VM), the host reads
the archives back and uploads them to the fake GitLab (a real local server that
checks GitLab's shapes: each ``artifact_type`` with its ``artifact_format``, a
zip a zip, a gzip a valid gzip). What is asserted is what GitLab ends up with:
the job's final state and reason, its trace, and the bytes it was given.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import time
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runner.errors import ForgeUnavailable
from runner.execution import Outcome
from runner.forge.gitlab import _collect
from runner.forge.gitlab.cache import ProjectCaches
from runner.forge.gitlab.client import GitLabClient
from runner.forge.gitlab.layout import GuestLayout
from runner.forge.gitlab.payload import JobPayload
from runner.forge.gitlab.poller import JobPoller
from runner.forge.gitlab.session import JobOutcome, TraceStream
from runner.forge.gitlab.transfer import upload_artifact
from runner.forge.gitlab.work import GuestRun
from runner.secret import Secret
from runner.service.jobs import JobState
from runner.vm.backend import BackendContext, Machine, MachineSpec
from tests.backends import toy
from tests.backends.toy import toy_settings
from tests.fake_gitlab import FakeGitLab, FakeJob, gzip_members, make_job, running_fake, variable

RUNNER = Secret("glrt-fake-runner")

JUNIT = b'<testsuites><testsuite name="unit" tests="1"><testcase name="ok"/></testsuite>' \
        b"</testsuites>\n"
SAST = b'{"version": "15.0.0", "vulnerabilities": []}\n'


@pytest.fixture
async def gitlab() -> AsyncIterator[FakeGitLab]:
    async with running_fake(update_interval=0) as fake:
        yield fake


@pytest.fixture
async def machine(tmp_path: Path) -> AsyncIterator[Machine]:
    settings = toy_settings(tmp_path)
    hv = toy.hypervisor(BackendContext(settings.vm, tmp_path / "vms", None))
    spec = MachineSpec(vcpus=1, memory_mib=128, kernel=tmp_path / "image" / "vmlinux",
                       initramfs=tmp_path / "image" / "initramfs", cmdline="", accel="tcg",
                       cpu="max")
    vm = await hv.boot(spec, tmp_path / "image" / "rootfs.ext4")
    yield vm
    await vm.destroy()


class NoJobLog:
    """The daemon port as `GuestRun` uses it here: no daemon job log."""

    def job_log(self, job_id: str) -> None:
        return None


@dataclass
class Ran:
    fake: FakeJob
    daemon: Outcome
    run: GuestRun

    @property
    def trace(self) -> str:
        return self.fake.trace.decode(errors="replace")

    @property
    def final(self) -> dict[str, Any]:
        return self.fake.updates[-1]


async def run_job(gitlab: FakeGitLab, machine: Machine, tmp_path: Path, job_id: int,
                  **kw: Any) -> Ran:
    """One job through `GuestRun.work` and the final update, as the GitLab source runs it."""
    kw.setdefault("variables", []).append(variable("GIT_STRATEGY", "none"))
    fake = await gitlab.enqueue(make_job(job_id, server_url=gitlab.url, **kw))
    layout = GuestLayout(str(tmp_path / f"builds-{job_id}"), str(tmp_path / f"work-{job_id}"))
    async with GitLabClient(gitlab.url) as client:
        job = await JobPoller(client, RUNNER, system_id="s_test").next_job()
        async with TraceStream.for_job(client, job, update_interval_s=0.05) as trace:
            run = GuestRun(client, job, trace, layout, NoJobLog(),  # type: ignore[arg-type]
                           ProjectCaches(tmp_path / "caches", job.job_info.project_id))
            daemon = await run.work(machine, 60.0)
            assert run.result is not None
            await trace.finish(run.result)
    return Ran(fake, daemon, run)


def _artifact(name: str, paths: list[str], kind: str = "archive", fmt: str = "zip",
              when: str = "on_success") -> dict[str, Any]:
    return {"name": name, "untracked": False, "paths": paths, "exclude": [], "when": when,
            "artifact_type": kind, "artifact_format": fmt, "expire_in": ""}


# -- formats ----------------------------------------------------------------------


async def test_reports_go_up_as_gzip_members_and_raw_files_as_gitlab_asks(
    gitlab: FakeGitLab, machine: Machine, tmp_path: Path
) -> None:
    script = ["mkdir -p out reports/more",
              f"printf '%s' '{JUNIT.decode().strip()}' > reports/unit.xml",
              "printf '<testsuites/>' > reports/more/api.xml",
              "echo built > out/app.txt",
              f"printf '%s' '{SAST.decode().strip()}' > gl-sast-report.json",
              "printf 'VERSION=1.2.3\\n' > build.env"]
    ran = await run_job(gitlab, machine, tmp_path, 301, script=script, artifacts=[
        _artifact("build", ["out/"]),
        _artifact("junit", ["reports/**/*.xml"], "junit", "gzip", "always"),
        _artifact("sast", ["gl-sast-report.json"], "sast", "raw", "always"),
        _artifact("dotenv", ["build.env"], "dotenv", "gzip", "always"),
    ])
    assert ran.final["state"] == "success", ran.trace
    assert ran.daemon.state is JobState.SUCCEEDED
    uploads = {query["artifact_type"]: (query, name, data)
               for query, name, data in ran.fake.artifacts}
    assert sorted(uploads) == ["archive", "dotenv", "junit", "sast"]

    query, name, data = uploads["archive"]
    assert (query["artifact_format"], name) == ("zip", "build.zip")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.namelist() == ["out/app.txt"]

    query, name, data = uploads["junit"]
    assert (query["artifact_format"], name) == ("gzip", "junit.gz")
    assert gzip_members(data) == [  # one member per file; FNAME its name, FCOMMENT its path
        ("api.xml", "reports/more/api.xml", b"<testsuites/>"),
        ("unit.xml", "reports/unit.xml", JUNIT.strip()),
    ]
    query, name, data = uploads["dotenv"]
    assert (query["artifact_format"], name) == ("gzip", "dotenv.gz")
    assert gzip_members(data) == [("build.env", "build.env", b"VERSION=1.2.3\n")]

    query, name, data = uploads["sast"]
    assert (query["artifact_format"], name) == ("raw", "sast")
    assert data == SAST.strip()  # the file as it is
    assert "not supported by this runner" not in ran.trace


async def test_a_raw_report_matching_two_files_fails_the_job(
    gitlab: FakeGitLab, machine: Machine, tmp_path: Path
) -> None:
    ran = await run_job(gitlab, machine, tmp_path, 302,
                        script=["echo '{}' > gl-a.json", "echo '{}' > gl-b.json"],
                        artifacts=[_artifact("sast", ["gl-*.json"], "sast", "raw", "always")])
    assert ran.final["state"] == "failed"
    assert ran.final["failure_reason"] == "script_failure"
    assert "only one file can be sent as raw, 2 matched: gl-a.json, gl-b.json" in ran.trace
    assert ran.fake.artifacts == []


def test_gzip_member_is_what_gzip_reads_and_names_the_file(tmp_path: Path) -> None:
    import gzip

    (tmp_path / "a").mkdir()
    payload = os.urandom(3 << 20)  # more than one read block
    (tmp_path / "a" / "big.bin").write_bytes(payload)
    (tmp_path / "a" / "caf\u00e9.txt").write_bytes(b"")
    out = tmp_path / "out.gz"
    _collect.write_gzip(str(tmp_path), ["a/big.bin", "a/caf\u00e9.txt"], str(out))
    assert gzip.decompress(out.read_bytes()) == payload  # gzip reads all members
    assert [(n, c, len(d)) for n, c, d in gzip_members(out.read_bytes())] == [
        ("big.bin", "a/big.bin", len(payload)), ("caf\u00e9.txt", "a/caf\u00e9.txt", 0)]


# -- refusals and failures ------------------------------------------------------------


async def test_artifacts_gitlab_refuses_fail_the_job_with_the_reason_in_the_trace(
    gitlab: FakeGitLab, machine: Machine, tmp_path: Path
) -> None:
    gitlab.fail_next("upload", 413)
    ran = await run_job(gitlab, machine, tmp_path, 303, script=["echo x > big.bin"],
                        artifacts=[_artifact("build", ["big.bin"])])
    assert ran.final["state"] == "failed"
    assert ran.final["failure_reason"] == "script_failure"
    assert ran.final["exit_code"] == 1
    assert ran.daemon.state is JobState.FAILED
    assert "413" in (ran.daemon.reason or "")
    trace = ran.trace
    assert 'Uploading artifacts as "archive" to coordinator... too large archive' in trace
    assert "ERROR: Job failed: the artifacts 'archive' were refused by GitLab" in trace
    assert gitlab.count("POST", "/artifacts") == 1  # a refusal is not retried


async def test_gitlab_unavailable_through_the_retries_is_a_system_failure(
    gitlab: FakeGitLab, machine: Machine, tmp_path: Path
) -> None:
    gitlab.fail_next("upload", 502, 503, 502)
    ran = await run_job(gitlab, machine, tmp_path, 304, script=["echo x > f.txt"],
                        artifacts=[_artifact("build", ["f.txt"])])
    assert ran.final["state"] == "failed"
    assert ran.final["failure_reason"] == "runner_system_failure"
    assert ran.daemon.state is JobState.SYSTEM_FAILURE
    assert "GitLab is unavailable" in (ran.daemon.reason or "")
    assert "(attempt 3 of 3)" in ran.trace
    assert "were not uploaded, GitLab is unavailable" in ran.trace
    assert gitlab.count("POST", "/artifacts") == 3


async def test_a_job_that_failed_keeps_its_reason_when_its_artifacts_are_refused(
    gitlab: FakeGitLab, machine: Machine, tmp_path: Path
) -> None:
    gitlab.fail_next("upload", 413)
    ran = await run_job(gitlab, machine, tmp_path, 305, script=["echo log > job.log", "exit 7"],
                        artifacts=[_artifact("logs", ["job.log"], when="on_failure")])
    assert ran.final["state"] == "failed"
    assert ran.final["failure_reason"] == "script_failure"
    assert ran.final["exit_code"] == 7  # the job's own failure, not the upload's
    assert "too large archive" in ran.trace


# -- slow and stalled uploads -----------------------------------------------------------


async def test_a_slow_upload_outlasting_the_request_timeout_succeeds(
    gitlab: FakeGitLab, tmp_path: Path
) -> None:
    gitlab.upload_chunk_delay_s = 0.02  # 3 MiB in 64 KiB reads: about a second
    data = random.Random(5).randbytes(3 << 20)
    async with GitLabClient(gitlab.url, timeout_s=0.3) as client:
        await gitlab.enqueue(make_job(306, artifacts=[_artifact("build", ["out/"])]))
        job = await JobPoller(client, RUNNER, system_id="s_test").next_job()
        async with TraceStream.for_job(client, job, update_interval_s=0.05) as trace:
            started = time.monotonic()
            await upload_artifact(client, job, trace, job.artifacts[0], _zip_of(data),
                                  attempts=1)
            took = time.monotonic() - started
            await trace.finish(JobOutcome.success())
    assert took > 0.6  # well past the 0.3 s every other request gets
    (_query, _name, got), = gitlab.jobs[306].artifacts
    with zipfile.ZipFile(io.BytesIO(got)) as z:
        assert z.read("blob") == data


async def test_an_upload_gitlab_stops_reading_fails_as_unavailable(gitlab: FakeGitLab) -> None:
    gitlab.upload_chunk_delay_s = 30.0  # reads one chunk, then nothing for the test's life
    await gitlab.enqueue(make_job(307, artifacts=[_artifact("build", ["out/"])]))
    async with GitLabClient(gitlab.url, transfer_read_s=0.5) as client:
        job = await JobPoller(client, RUNNER, system_id="s_test").next_job()
        started = time.monotonic()
        with pytest.raises(ForgeUnavailable) as err:
            # Larger than loopback's socket buffers, so the sender must wait on GitLab.
            await client.upload_artifact(job.id, job.token, _zip_of(b"\0" * (64 << 20),
                                                                    stored=True),
                                         filename="build.zip")
    assert "made no progress for 0.5 s" in str(err.value)
    assert time.monotonic() - started < 10


async def test_downloads_have_no_total_timeout_but_a_stalled_one_fails(
    gitlab: FakeGitLab, tmp_path: Path
) -> None:
    archive = _zip_of(random.Random(6).randbytes(1 << 20))
    dep = gitlab.add_finished_job(make_job(308), archive)
    async with GitLabClient(gitlab.url, timeout_s=0.2, transfer_read_s=0.5) as client:
        gitlab.download_chunk_delay_s = 0.05  # 16 chunks: about 0.8 s, each in time
        started = time.monotonic()
        size = await client.download_artifacts(dep.id, Secret(dep.token), tmp_path / "a.zip")
        assert time.monotonic() - started > 0.6
        assert (size, (tmp_path / "a.zip").read_bytes()) == (len(archive), archive)
        gitlab.download_chunk_delay_s = 30.0  # one chunk, then silence
        with pytest.raises(ForgeUnavailable) as err:
            await asyncio.wait_for(
                client.download_artifacts(dep.id, Secret(dep.token), tmp_path / "b.zip"), 10)
    assert "Timeout" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]  # no partial file left


def _zip_of(data: bytes, *, stored: bool = False) -> bytes:
    out = io.BytesIO()
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(out, "w", method) as z:
        z.writestr("blob", data)
    return out.getvalue()


def test_payload_artifacts_parse_with_their_formats() -> None:
    job = JobPayload.parse(make_job(1, artifacts=[_artifact("junit", ["r.xml"], "junit",
                                                            "gzip", "always")]))
    assert (job.artifacts[0].artifact_type, job.artifacts[0].artifact_format) == (
        "junit", "gzip")
