"""GitHub Actions end to end: a fake GitHub (checked against the published schema),
signed webhook deliveries, the real daemon, and JIT runners in real VMs."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from runner.api.client import ApiClient
from runner.config import Settings
from runner.images import build_image
from tests.daemons import DaemonProcess, wait_terminal
from tests.fake_github import FakeGitHub
from tests.test_github_webhook import job_payload, sign

pytestmark = pytest.mark.vm
REPO = "octo-org/hello"
SECRET = b"It's a Secret to Everybody"
LABELS = ["self-hosted", "linux", "snapfleet"]
PREFIX = "snapfleet-testhost-"


@pytest.fixture(scope="session")
async def runner_image(settings: Settings) -> Path:
    """The github-runner image, with a stand-in for GitHub's runner tarball."""
    from tests.test_images import standin_runner_tarball

    tarball = standin_runner_tarball(settings.paths.cache_dir / "test-inputs")
    os.environ["SNAPFLEET_RUNNER_TARBALL"] = str(tarball)
    await build_image("github-runner", cache_dir=settings.paths.cache_dir,
                      progress=lambda m: print(f"[setup] {m}", flush=True))
    return Path(tarball)


@pytest.fixture
async def fake() -> AsyncIterator[FakeGitHub]:
    server = FakeGitHub(prefix="/api/v3")
    await server.start()
    server.add_token("ghs_test_token")
    yield server
    await server.close()
    assert server.violations == [], "requests or responses outside GitHub's published schema"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def gh_daemon(daemon_factory: Any, fake: FakeGitHub, runner_image: Path
                    ) -> AsyncIterator[DaemonProcess]:
    port = free_port()
    toml = f"""
[github]
api_url = "{fake.url}"
scopes = ["{REPO}"]
token = "ghs_test_token"
webhook_secret = "{SECRET.decode()}"
webhook_listen = "127.0.0.1:{port}"
reconcile_interval_s = 1
host = "testhost"

[profiles.default]

[profiles.gh]
image = "github-runner"
labels = {json.dumps(LABELS)}
"""
    d: DaemonProcess = daemon_factory(toml=toml,
                                      env={"SNAPFLEET_RUNNER_TARBALL": str(runner_image)})
    d.webhook_url = f"http://127.0.0.1:{port}/webhooks/github"  # type: ignore[attr-defined]
    d.start()
    d.wait_for("READY=1")
    yield d
    assert d.stop() == 0


def delivery(action: str, job_id: int, labels: list[str], *, runner: str | None = None
             ) -> dict[str, Any]:
    payload = job_payload(action)
    payload["workflow_job"].update(id=job_id, labels=labels, runner_name=runner)
    return payload


async def post(url: str, payload: dict[str, Any], *, delivery_id: str | None = None,
               secret: bytes = SECRET, event: str = "workflow_job") -> tuple[int, float]:
    body = json.dumps(payload).encode()
    headers = {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery_id or os.urandom(8).hex(),
        "X-Hub-Signature-256": sign(body, secret),
        "Content-Type": "application/json",
    }
    started = time.monotonic()
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as r:
        return r.status, time.monotonic() - started


async def until(predicate: Any, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def report_taken(url: str, fake: FakeGitHub, job_id: int) -> None:
    """Play GitHub: the runner we registered took the job."""
    runner_id = next(iter(fake.jit_configs))
    name = next(r["name"] for r in fake.runners[REPO].values() if r["id"] == runner_id)
    await post(url, delivery("in_progress", job_id, LABELS, runner=name))


async def github_jobs(d: DaemonProcess) -> list[dict[str, Any]]:
    async with ApiClient(d.api) as api:
        return [j for j in await api.jobs(limit=500) if j["source"] == "github"]


async def test_queued_delivery_runs_a_jit_runner_in_a_fresh_vm(
    gh_daemon: DaemonProcess, fake: FakeGitHub
) -> None:
    url = gh_daemon.webhook_url  # type: ignore[attr-defined]
    status, answered = await post(url, delivery("queued", 7001, LABELS))
    assert status == 202
    assert answered < 1.0  # answered before any VM work
    await until(lambda: fake.jit_configs, what="a JIT config request")
    runner_id, jit = next(iter(fake.jit_configs.items()))
    runner = next(r for r in fake.runners[REPO].values() if r["id"] == runner_id)
    assert runner["name"].startswith(PREFIX)
    assert [label["name"] for label in runner["labels"]] == LABELS
    # GitHub tells us the runner took the job.
    await post(url, delivery("in_progress", 7001, LABELS, runner=runner["name"]))
    jobs: list[dict[str, Any]] = []

    async def runner_finished() -> None:
        while not (jobs and jobs[0]["state"] not in ("queued", "starting", "running")):
            jobs[:] = await github_jobs(gh_daemon)
            await asyncio.sleep(0.2)

    await asyncio.wait_for(runner_finished(), 180)
    assert jobs[0]["state"] == "succeeded", jobs[0]
    async with ApiClient(gh_daemon.api) as api:
        log = b"".join([c async for c in api.logs(jobs[0]["id"])]).decode()
        assert f"jit ok runner_id={runner_id}" in log
        history = (await api.job(jobs[0]["id"]))["history"]
        assert any("GitHub job 7001 of octo-org/hello in_progress" in (h["reason"] or "")
                   for h in history)
        assert (await api.status())["vms"] == []
    # The registration of a runner whose VM is gone ends too.
    await until(lambda: runner_id not in fake.runners[REPO], 30, "the runner to be deleted")
    # The JIT config was never written on the host: not in logs, not in the state DB.
    for path in gh_daemon.root.rglob("*"):
        if path.is_file() and not path.is_socket():
            assert jit.encode() not in path.read_bytes(), f"JIT config leaked into {path}"
    assert len(fake.jit_configs) == 1  # one queued job, one runner


async def test_bad_signature_is_refused_and_starts_nothing(
    gh_daemon: DaemonProcess, fake: FakeGitHub
) -> None:
    url = gh_daemon.webhook_url  # type: ignore[attr-defined]
    status, _ = await post(url, delivery("queued", 7002, LABELS), secret=b"wrong")
    assert status == 401
    await asyncio.sleep(3)  # a few reconcile passes
    assert fake.jit_configs == {}
    assert await github_jobs(gh_daemon) == []


async def test_duplicate_delivery_starts_one_runner(gh_daemon: DaemonProcess,
                                                    fake: FakeGitHub) -> None:
    url = gh_daemon.webhook_url  # type: ignore[attr-defined]
    payload = delivery("queued", 7003, LABELS)
    assert (await post(url, payload, delivery_id="dup-1"))[0] == 202
    assert (await post(url, payload, delivery_id="dup-1"))[0] == 200
    await until(lambda: fake.jit_configs, what="a JIT config request")
    await report_taken(url, fake, 7003)
    await asyncio.sleep(3)
    assert len(fake.jit_configs) == 1


async def test_missed_webhook_is_caught_by_the_reconcile_loop(
    gh_daemon: DaemonProcess, fake: FakeGitHub
) -> None:
    run_id, _job_id = fake.add_job(REPO, LABELS)  # queued on GitHub; no delivery arrives
    await until(lambda: fake.jit_configs, 30, "the reconcile loop to start a runner")
    for job in fake.jobs[run_id]:  # the runner took it, as GitHub would report
        job["status"] = "in_progress"
    jobs = await github_jobs(gh_daemon)
    assert len(jobs) == 1
    async with ApiClient(gh_daemon.api) as api:
        done = await wait_terminal(api, [jobs[0]["id"]])
    assert done[jobs[0]["id"]]["state"] == "succeeded"
    await asyncio.sleep(2)
    assert len(fake.jit_configs) == 1  # the job is no longer queued: no second runner


async def test_orphaned_registration_is_deleted(gh_daemon: DaemonProcess,
                                                fake: FakeGitHub) -> None:
    orphan = fake.add_runner(REPO, PREFIX + "deadbeef", status="offline")
    other = fake.add_runner(REPO, "someone-elses-runner", status="offline")
    await until(lambda: orphan not in fake.runners[REPO], 30, "the orphan to be deleted")
    assert other in fake.runners[REPO]  # not ours: left alone


async def test_unserved_labels_start_nothing(gh_daemon: DaemonProcess, fake: FakeGitHub) -> None:
    url = gh_daemon.webhook_url  # type: ignore[attr-defined]
    status, _ = await post(url, delivery("queued", 7004, ["self-hosted", "arm64"]))
    assert status == 202
    ping_status, _ = await post(url, {"zen": "Keep it logically awesome.", "hook_id": 1},
                                event="ping")
    assert ping_status == 200
    await asyncio.sleep(3)
    assert fake.jit_configs == {}
    assert "labels no profile serves" in gh_daemon.log()
