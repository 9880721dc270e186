"""The daemon as a GitLab runner, end to end: a fake GitLab, a real daemon, real VMs.

The daemon polls the fake GitLab (on loopback) with ``[[gitlab.runners]]``;
each job runs in a VM restored for it, which checks the project out from a git
repository served by ``git http-backend`` on the host. A guest reaches the
host only through ``[net] allow_host_ports``, at its gateway 172.16.0.1, so
the git server listens on all addresses on a port offered that way, and the
job payload names ``http://172.16.0.1:<port>`` as GitLab's URL.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from runner.api.client import ApiClient
from tests.daemons import DaemonProcess
from tests.fake_gitlab import FakeGitLab, FakeJob, gzip_members, running_fake, variable
from tests.git_http import GitServer, serve_repo

pytestmark = pytest.mark.vm
GATEWAY = "172.16.0.1"
RUNNER_TOKEN = "glrt-fake-runner"
MASKED = "k3y-v4lue-s3cr3t"


@pytest.fixture(scope="module")
async def git_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GitServer]:
    """A repository with two commits, over HTTP with GitLab's basic auth, for guests."""
    commits = [{"README.md": "first\n"},
               {"README.md": "second commit readme\n",
                "build.sh": "mkdir -p out && echo built > out/app.txt\n"}]
    # All addresses: a guest's packets arrive on its veth's host end (DNAT in its namespace).
    async with serve_repo(tmp_path_factory.mktemp("gitsrv"), commits, bind="0.0.0.0",
                          advertise=GATEWAY) as server:
        yield server


@pytest.fixture
async def fake() -> AsyncIterator[FakeGitLab]:
    async with running_fake(update_interval=1, long_poll_s=5) as server:
        yield server


@pytest.fixture
def gl_daemon(daemon_factory: Any, fake: FakeGitLab, git_server: GitServer, tmp_path: Path
              ) -> Callable[[], DaemonProcess]:
    token_file = tmp_path / "runner-token"
    token_file.write_text(RUNNER_TOKEN + "\n")
    token_file.chmod(0o600)
    port = int(git_server.url.rsplit(":", 1)[1])
    toml = f"""
[[gitlab.runners]]
url = "{fake.url}"
runner_id = 77
token_file = "{token_file}"
tags = ["microvm"]
check_interval_s = 0.5

[profiles.default]
labels = ["microvm"]
"""

    def make() -> DaemonProcess:
        d: DaemonProcess = daemon_factory(
            toml=toml, env={"SNAPFLEET_NET__ALLOW_HOST_PORTS": json.dumps([port])})
        return d

    return make


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def final_update(job: FakeJob) -> dict[str, Any]:
    finals = [u for u in job.updates if u["state"] != "running"]
    assert finals, "no final update"
    return finals[-1]


def _files_holding(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_socket():
            try:
                if needle in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return found


async def test_jobs_pass_fail_time_out_and_cancel_in_vms(
    gl_daemon: Callable[[], DaemonProcess], fake: FakeGitLab, git_server: GitServer
) -> None:
    d = gl_daemon()
    d.start()
    d.wait_for("READY=1")
    passing = await fake.enqueue(git_server.job(
        501, variables=[variable("DEPLOY_KEY", MASKED, masked=True)],
        script=["sh build.sh", "cat README.md", 'echo "key=$DEPLOY_KEY"',
                'printf "%s" "$DEPLOY_KEY" | cut -c1-8',
                "printf '<testsuites/>' > junit.xml"],
        artifacts=[{"name": "build", "untracked": False, "paths": ["out/"], "exclude": [],
                    "when": "on_success", "artifact_type": "archive",
                    "artifact_format": "zip", "expire_in": "1 day"},
                   {"name": "junit", "untracked": False, "paths": ["junit.xml"], "exclude": [],
                    "when": "always", "artifact_type": "junit",
                    "artifact_format": "gzip", "expire_in": "1 day"}],
    ))
    await until(lambda: passing.status == "success", 300, "the passing job")
    trace = passing.trace.decode(errors="replace")
    assert "Running with snapfleet" in trace
    assert "second commit readme" in trace  # checked out at the job's sha, in the VM
    assert "key=[MASKED]" in trace
    update = final_update(passing)
    assert update["state"] == "success"
    assert len(passing.artifacts) == 2
    # The report, made by the guest's python3 as gitlab-runner makes it: one gzip member.
    assert gzip_members(passing.artifacts[1][2]) == [("junit.xml", "junit.xml",
                                                      b"<testsuites/>")]
    query, filename, data = passing.artifacts[0]
    assert filename == "build.zip"
    assert query.get("artifact_type") == "archive"
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert "out/app.txt" in z.namelist()
        assert z.read("out/app.txt") == b"built\n"
    # The masked value never left the host unmasked (trace, updates, anything).
    for recorded in fake.requests:
        assert MASKED.encode() not in recorded.body, recorded.path

    # A later job gets 501's artifacts as a dependency, and a file variable as a file.
    size = len(data)
    consumer = await fake.enqueue(git_server.job(
        505, variables=[variable("SETTINGS", "mode=fast\n", file=True)],
        dependencies=[{"id": passing.id, "name": "build", "token": passing.token,
                       "artifacts_file": {"filename": "build.zip", "size": size}}],
        script=["cat out/app.txt", 'echo "settings at $SETTINGS"', 'cat "$SETTINGS"']))
    await until(lambda: consumer.status in ("success", "failed"), 300, "the dependent job")
    trace = consumer.trace.decode(errors="replace")
    assert consumer.status == "success", trace
    assert f"Downloading artifacts for build ({passing.id})" in trace
    assert "\nbuilt\n" in trace  # extracted into the checkout before the script
    assert "settings at /" in trace
    assert "\nmode=fast\n" in trace

    failing = await fake.enqueue(git_server.job(502, script=["echo before", "exit 3"]))
    await until(lambda: failing.status == "failed", 300, "the failing job")
    update = final_update(failing)
    assert update["failure_reason"] == "script_failure"
    assert update["exit_code"] == 3
    assert "before" in failing.trace.decode(errors="replace")

    # GitLab's shape: every step's timeout is the job's; the script keeps the deadline
    # itself, so after_script still runs (the agent's outer limit is not what fires).
    late = await fake.enqueue(git_server.job(504, timeout=8, script=["echo tick; sleep 60"],
                                             after_script=["echo after-the-deadline"]))
    await until(lambda: late.status == "failed", 120, "the job timeout")
    assert final_update(late)["failure_reason"] == "job_execution_timeout"
    late_trace = late.trace.decode(errors="replace")
    assert "ERROR: Job failed: execution took longer than 8s seconds" in late_trace
    assert "Job was canceled" not in late_trace
    assert "\nafter-the-deadline\n" in late_trace

    slow = await fake.enqueue(git_server.job(503, script=["echo started-slow; sleep 120"],
                                   after_script=["echo after-ran"]))
    await until(lambda: b"started-slow\n" in slow.trace, 300, "the slow job to start")
    fake.cancel(slow.id)
    await until(lambda: slow.status == "canceled", 30, "the cancel")
    assert slow.told_canceling_at is not None
    assert slow.ended_at is not None
    took = slow.ended_at - slow.told_canceling_at
    print(f"told canceling → final update: {took:.2f}s")
    assert took < 2.0, took  # SIGTERM to the step, the VM destroyed, GitLab told
    update = final_update(slow)
    assert update["state"] == "failed"
    assert "after-ran" not in slow.trace.decode(errors="replace")

    async with ApiClient(d.api) as api:
        jobs = await api.jobs()
    states = sorted((j["name"], j["state"]) for j in jobs if j["source"] == "gitlab-77")
    assert states == [("gitlab test #501", "succeeded"), ("gitlab test #502", "failed"),
                      ("gitlab test #503", "cancelled"), ("gitlab test #504", "timed_out"),
                      ("gitlab test #505", "succeeded")]
    assert d.stop() == 0
    # Neither the job tokens nor the masked value were left on disk (store, logs, journal).
    for job in (passing, failing, late, slow):
        assert _files_holding(d.root, job.token.encode()) == []
    assert _files_holding(d.root, MASKED.encode()) == []
    assert fake.count("POST", "/jobs/request") > 0


async def test_daemon_killed_mid_job_reports_it_failed_after_restart(
    gl_daemon: Callable[[], DaemonProcess], fake: FakeGitLab, git_server: GitServer
) -> None:
    d = gl_daemon()
    d.start()
    d.wait_for("READY=1")
    job = await fake.enqueue(git_server.job(601, script=["echo started-long; sleep 300"]))
    await until(lambda: b"started-long\n" in job.trace, 300, "the job to start")
    journal = d.run / "gitlab" / "runner-77"  # tmpfs on a real host (paths.runtime_dir)
    assert (journal / "601.json").stat().st_mode & 0o077 == 0
    assert _files_holding(journal, job.token.encode())  # kept to report the job...
    assert _files_holding(d.state, job.token.encode()) == []  # ...never on the state disk
    d.kill9()
    before = len(job.trace)
    assert job.status == "running"

    d.start()
    d.wait_for("READY=1")
    await until(lambda: job.status == "failed", 60, "the interrupted job's failure")
    update = final_update(job)
    assert update["failure_reason"] == "runner_system_failure"
    trace = job.trace.decode(errors="replace")
    assert len(job.trace) > before
    assert "it is not run again" in trace
    assert trace.count("started-long\n") == 1  # never run twice
    assert trace.count("Running with snapfleet") == 1
    assert trace.count("Running in microVM") == 1
    assert not list(journal.glob("*"))  # token and trace journal gone once reported
    given = [r for r in fake.requests if r.path.endswith("/jobs/request") and r.status == 201]
    assert len(given) == 1
    async with ApiClient(d.api) as api:
        jobs = [j for j in await api.jobs() if j["source"] == "gitlab-77"]
    assert [j["state"] for j in jobs] == ["system_failure"]
    assert d.stop() == 0
    assert _files_holding(d.root, job.token.encode()) == []


async def test_a_cache_passes_between_jobs_of_one_project_and_no_other(
    gl_daemon: Callable[[], DaemonProcess], fake: FakeGitLab, git_server: GitServer
) -> None:
    d = gl_daemon()
    d.start()
    d.wait_for("READY=1")
    cache = [{"key": "deps-main", "untracked": False, "policy": "pull-push",
              "paths": ["vendor/"], "when": "on_success", "fallback_keys": []}]
    writer = await fake.enqueue(git_server.job(
        701, cache=cache,
        script=["test ! -e vendor/lib.txt", "mkdir -p vendor && echo from-701 > vendor/lib.txt"]))
    await until(lambda: writer.status in ("success", "failed"), 300,
                "the job that fills the cache")
    assert writer.status == "success", writer.trace.decode(errors="replace")
    assert "Kept the cache deps-main on this host" in writer.trace.decode(errors="replace")

    reader = await fake.enqueue(git_server.job(702, cache=cache,
                                     script=["cat vendor/lib.txt"]))
    other = await fake.enqueue(git_server.job(703, cache=cache, project_id=99,
                                    script=["test ! -e vendor/lib.txt && echo clean"]))
    ended = ("success", "failed")
    await until(lambda: reader.status in ended and other.status in ended, 300,
                "the jobs that read the cache")
    assert reader.status == "success", reader.trace.decode(errors="replace")
    assert "from-701" in reader.trace.decode(errors="replace")
    assert other.status == "success", other.trace.decode(errors="replace")
    assert "no cache for deps-main yet" in other.trace.decode(errors="replace")
    assert d.stop() == 0
    # Kept in this instance's state dir, owner-only; nothing of it in the image cache.
    kept = list((d.state / "gitlab" / "caches" / "runner-77" / "42").iterdir())
    assert [p.suffix for p in kept] == [".zip"]
    assert kept[0].stat().st_mode & 0o077 == 0
    assert kept[0].parent.stat().st_mode & 0o077 == 0
