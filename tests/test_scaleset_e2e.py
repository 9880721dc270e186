"""Scale-set mode end to end: two real daemons (two hosts) against one fake scale-set
service, JIT runners in real VMs, and SIGTERM leaving nothing of ours on GitHub."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runner.api.client import ApiClient
from tests.daemons import DaemonProcess
from tests.fake_github import FakeGitHub
from tests.fake_scaleset import FakeScaleSetService
from tests.test_github_e2e import runner_image  # noqa: F401  (a fixture)

pytestmark = pytest.mark.vm
ORG = "octo-org"
REPO = "octo-org/hello"
LABELS = ["self-hosted", "linux", "snapfleet"]
TERMINAL = {"succeeded", "failed", "timed_out", "cancelled", "system_failure"}


@pytest.fixture
async def service() -> AsyncIterator[FakeScaleSetService]:
    github = FakeGitHub(prefix="/api/v3")
    await github.start()
    github.add_token("ghs_test_token")
    fake = FakeScaleSetService(github)
    yield fake
    await github.close()
    assert github.violations == [], "REST calls outside GitHub's published schema"
    assert fake.violations == [], "scale-set calls of the wrong shape"


def host_toml(url: str, host: str) -> str:
    return f"""
[github]
mode = "scaleset"
api_url = "{url}"
scopes = ["{ORG}"]
token = "ghs_test_token"
host = "{host}"

[profiles.default]

[profiles.gh]
image = "github-runner"
labels = {json.dumps(LABELS)}
"""


class GitHubPlayer:
    """Plays GitHub's side of each runner: it takes a job as soon as it registers, and
    the job ends when the runner's VM has ended."""

    def __init__(self, service: FakeScaleSetService, daemons: list[DaemonProcess]) -> None:
        self.service = service
        self.daemons = daemons
        self.taken: dict[str, int] = {}  # runner name -> request id
        self.finished: set[str] = set()
        self.jobs: dict[str, dict[str, Any]] = {}  # runner name -> daemon job (public)
        self.host_of: dict[str, DaemonProcess] = {}

    async def run(self) -> None:
        while True:
            for name in list(self.service.registered):
                if name not in self.taken:
                    with contextlib.suppress(StopIteration):  # nothing acquired for it
                        self.taken[name] = self.service.take_job(name)
            for d in self.daemons:
                async with ApiClient(d.api) as api:
                    for job in await api.jobs(limit=500):
                        name = (job["name"] or "").removeprefix("github runner ")
                        if job["source"] == "github-scaleset":
                            self.jobs[name], self.host_of[name] = job, d
            for name, rid in self.taken.items():
                record = self.jobs.get(name)
                if name not in self.finished and record and record["state"] in TERMINAL:
                    self.service.finish_job(rid)
                    self.finished.add(name)
            await asyncio.sleep(0.05)


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_two_hosts_share_jobs_within_capacity_and_leave_nothing_at_sigterm(
    daemon_factory: Any, service: FakeScaleSetService, runner_image: Path  # noqa: F811
) -> None:
    env = {"SNAPFLEET_RUNNER_TARBALL": str(runner_image)}
    hosts = [daemon_factory(toml=host_toml(service.github.url, name), env=env, concurrency="1")
             for name in ("host1", "host2")]
    for d in hosts:
        d.start()
    for d in hosts:
        d.wait_for("READY=1")
    await until(lambda: len(service.sessions) == 2, 60, "a session per host")
    names = sorted(s["name"] for s in service.scale_sets.values())
    assert names == ["snapfleet-host1-gh", "snapfleet-host2-gh"]
    jobs = [service.add_job(REPO, ["self-hosted", "linux"]) for _ in range(4)]
    player = GitHubPlayer(service, hosts)
    playing = asyncio.create_task(player.run())
    try:
        await until(lambda: len(player.finished) == 4, 600, "four runners to run their jobs")
    finally:
        playing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await playing

    # Each job acquired once, by one host; both hosts took part.
    won = [rid for _, _, got in service.acquire_calls for rid in got]
    assert sorted(won) == sorted(jobs)
    owners = service.acquired_by()
    assert {owners[rid] for rid in jobs} == set(service.scale_sets)
    # Never beyond a host's capacity (one job at a time): asked one at a time, told the
    # queue so, and no two runner VMs of one host overlapped.
    assert all(len(asked) <= 1 for _, asked, _ in service.acquire_calls)
    assert all(max(s.max_capacity) <= 1 for s in service.sessions.values())
    for d in hosts:
        mine = sorted((j for n, j in player.jobs.items() if player.host_of[n] is d),
                      key=lambda j: j["created_at"])
        assert mine, "each host ran runners"
        for before, after in itertools.pairwise(mine):
            assert after["started_at"] >= before["finished_at"], (before, after)
    # Each runner ran in a VM of its own with its own JIT config (the stand-in runner
    # prints the runner id it decoded from the config it was given).
    assert len(player.jobs) == 4
    for name, job in player.jobs.items():
        assert job["state"] == "succeeded", job
        async with ApiClient(player.host_of[name].api) as api:
            log = b"".join([c async for c in api.logs(job["id"])]).decode()
        assert f"jit ok runner_id={service.registered[name]}" in log, log

    # The JIT configs reached the guests through memory only: no file of either host
    # holds one (database, logs, state files).
    for d in hosts:
        for path in d.root.rglob("*"):
            if path.is_file() and not path.is_socket():
                data = path.read_bytes()
                assert not any(c.encode() in data for c in service.jit_configs.values()), path

    sessions = {s.id for s in service.sessions.values()}
    # SIGTERM both (off the loop: the fake serves their last requests on it).
    codes = await asyncio.gather(*(asyncio.to_thread(d.stop) for d in hosts))
    assert codes == [0, 0]
    assert service.sessions == {}
    assert set(service.sessions_deleted) == sessions
    assert service.runners == {}, "a runner of ours is left registered"
    assert len(service.registered) == 4  # one runner per job, none after SIGTERM
