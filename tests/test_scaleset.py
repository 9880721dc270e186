"""The runner scale-set listener and client against a fake scale-set service (real HTTP).

The fake is served by the fake GitHub (its REST half is checked against
GitHub's published schema); the listener runs for real, with a stand-in
host whose capacity the test sets and which records each runner started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from runner.forge.github import scaleset as proto
from runner.forge.github._http import RetryPolicy
from runner.forge.github.api import GitHubClient
from runner.forge.github.config import GitHubConfig
from runner.forge.github.health import BackoffPolicy, ProfileHealth
from runner.forge.github.scaleset_client import ActionsService, MessageSession, ScaleSetClient
from runner.forge.github.scaleset_listener import ListenerConfig, ScaleSetListener
from runner.forge.github.types import JitConfig, Register, Scope
from tests.fake_github import FakeGitHub
from tests.fake_scaleset import FakeScaleSetService

ORG = "octo-org"
REPO = "octo-org/hello"
LABELS = ("self-hosted", "linux", "snapfleet")
FAST = RetryPolicy(max_attempts=4, max_wait_s=5, base_delay_s=0.01, max_delay_s=0.05)


@dataclass
class Fleet:
    github: FakeGitHub
    service: FakeScaleSetService
    clients: list[GitHubClient] = field(default_factory=list)
    services: list[ActionsService] = field(default_factory=list)

    async def client(self, **options: Any) -> ScaleSetClient:
        config = GitHubConfig.model_validate(
            {"api_url": self.github.url, "scopes": [ORG], "token": "ghs_test_token"}
        )
        rest = GitHubClient.from_config(config, retry=FAST)
        service = ActionsService(rest, Scope.parse(ORG), retry=FAST, **options)
        self.clients.append(rest)
        self.services.append(service)
        return ScaleSetClient(service)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    github = FakeGitHub(prefix="/api/v3")
    await github.start()
    github.add_token("ghs_test_token")
    service = FakeScaleSetService(github)
    service.poll_s = 0.3
    made = Fleet(github, service)
    yield made
    for svc in made.services:
        await svc.close()
    for rest in made.clients:
        await rest.close()
    await github.close()
    assert github.violations == [], "REST calls outside GitHub's published schema"
    assert service.violations == [], "scale-set calls of the wrong shape"


class Host:
    """A stand-in for the daemon: ``free`` slots; records each runner it was asked to run."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.started: list[JitConfig] = []
        self.listener: ScaleSetListener | None = None

    def capacity(self) -> int:
        return self.free

    async def start_runner(self, name: str, register: Register) -> JitConfig | None:
        assert self.free > 0, "asked to run beyond capacity"
        jit = await register()
        assert jit.name == name
        self.free -= 1
        self.started.append(jit)
        return jit

    def runner_ended(self, name: str) -> None:
        self.free += 1
        assert self.listener is not None
        self.listener.runner_ended(name)


@contextlib.asynccontextmanager
async def listening(
    client: ScaleSetClient, host: Host, *, owner: str = "h1", **options: Any
) -> AsyncIterator[tuple[ScaleSetListener, asyncio.Event]]:
    state_file: Path | None = options.pop("state_file", None)
    health: ProfileHealth | None = options.pop("health", None)
    config = ListenerConfig(
        profile="gh", scale_set_name=f"snapfleet-{owner}-gh", labels=LABELS, owner=owner,
        runner_prefix=f"snapfleet-{owner}-", conflict_retry_s=0.1,
        errors=RetryPolicy(base_delay_s=0.02, max_delay_s=0.1), **options,
    )
    listener = ScaleSetListener(client, config, capacity=host.capacity,
                                start_runner=host.start_runner, state_file=state_file,
                                health=health)
    host.listener = listener
    stopping = asyncio.Event()
    task = asyncio.create_task(listener.run(stopping))
    try:
        await until(lambda: (listener.session is not None and listener.session.session is not None)
                    or task.done(), what="a session")
        if task.done():
            task.result()
        yield listener, stopping
    finally:
        stopping.set()
        await asyncio.wait_for(task, 15)


async def until(predicate: Callable[[], object], timeout: float = 10, what: str = "condition"
                ) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# -- intake decisions (pure) ------------------------------------------------------------


def event(kind: proto.MessageType, rid: int, runner: str | None = None) -> proto.JobMessage:
    return proto.JobMessage(kind, rid, f"job-{rid}", REPO, ("linux",), runner)


def batch(mid: int, *jobs: proto.JobMessage, assigned: int = 0) -> proto.Batch:
    return proto.Batch(mid, proto.Statistics(assigned=assigned), tuple(jobs))


AVAILABLE, ASSIGNED = proto.MessageType.AVAILABLE, proto.MessageType.ASSIGNED
STARTED, COMPLETED = proto.MessageType.STARTED, proto.MessageType.COMPLETED


@pytest.mark.parametrize(("free", "max_runners", "offers", "want"), [
    (0, 10, [1, 2], ()),
    (1, 10, [1, 2], (1,)),
    (5, 10, [3, 1, 2], (1, 2, 3)),
    (5, 2, [1, 2, 3], (1, 2)),
])
def test_intake_acquires_within_free_capacity_and_max_runners(
    free: int, max_runners: int, offers: list[int], want: tuple[int, ...]
) -> None:
    intake = proto.Intake(max_runners=max_runners)
    assert intake.receive(batch(1, *(event(AVAILABLE, r) for r in offers)))
    assert intake.to_acquire(free) == want


def test_intake_starts_runners_for_assigned_jobs_before_acquiring_more() -> None:
    intake = proto.Intake(max_runners=10)
    intake.receive(batch(1, event(ASSIGNED, 1), event(ASSIGNED, 2), event(AVAILABLE, 3)))
    assert intake.to_start(free=2) == 2
    assert intake.to_acquire(free=2) == ()  # both slots go to the assigned jobs
    intake.runner_started("r1")
    intake.runner_started("r2")
    assert intake.to_start(free=0) == 0
    assert not intake.receive(batch(1, event(ASSIGNED, 9)))  # redelivered: ignored
    intake.receive(batch(2, event(STARTED, 1, "r1"), event(COMPLETED, 2)))  # 2 cancelled
    assert intake.surplus() == 1  # r2 waits for a job that will not come
    assert intake.runner_ended("r1") is True
    assert intake.runner_ended("r2") is False  # ended without a job


def test_intake_after_a_restart_runs_the_jobs_already_assigned() -> None:
    intake = proto.Intake(max_runners=10)
    intake.resume(proto.Statistics(assigned=3, running=1))
    assert intake.to_start(free=5) == 2
    intake.receive(batch(1, event(STARTED, 77, "someone")))  # one of the backlog started
    assert intake.to_start(free=5) == 1


# -- the client on its own ---------------------------------------------------------------


async def test_scale_set_is_created_once_with_the_profile_labels(fleet: Fleet) -> None:
    client = await fleet.client()
    made = await client.ensure_scale_set("snapfleet-h1-gh", 1, LABELS)
    again = await client.ensure_scale_set("snapfleet-h1-gh", 1, LABELS)
    assert made == again
    assert made.labels == LABELS
    assert made.runner_group_id == 1
    assert len(fleet.service.scale_sets) == 1
    # New labels in the config update the scale set rather than making a second one.
    changed = await client.ensure_scale_set("snapfleet-h1-gh", 1, (*LABELS, "gpu"))
    assert changed.id == made.id
    assert "gpu" in changed.labels
    # The admin token came from a registration token, through runner-registration.
    assert fleet.github.registration_tokens
    assert fleet.service.admin_tokens
    assert ("POST", f"/api/v3/orgs/{ORG}/actions/runners/registration-token") in \
        fleet.github.requests


async def test_acquire_answers_only_the_jobs_this_scale_set_won(fleet: Fleet) -> None:
    """Partial success: a job another scale set acquired first is left out of the answer."""
    client_a, client_b = await fleet.client(), await fleet.client()
    set_a = await client_a.ensure_scale_set("a", 1, LABELS)
    set_b = await client_b.ensure_scale_set("b", 1, LABELS)
    a = MessageSession(client_a.service, set_a.id, "host-a")
    b = MessageSession(client_b.service, set_b.id, "host-b")
    await a.create()
    await b.create()
    first, second = fleet.service.add_job(REPO, ["self-hosted"]), fleet.service.add_job(
        REPO, ["self-hosted"])
    assert await a.acquire([first]) == [first]
    assert await b.acquire([first, second]) == [second]
    assert fleet.service.acquired_by() == {first: set_a.id, second: set_b.id}
    await a.delete()
    await b.delete()


async def test_a_revoked_admin_token_is_replaced_once(fleet: Fleet) -> None:
    client = await fleet.client()
    await client.ensure_scale_set("a", 1, LABELS)
    fleet.service.revoke_admin_tokens()
    await client.ensure_scale_set("a", 1, LABELS)  # 401, new admin token, same call again
    assert client.service.admin_fetches == 2
    assert len(fleet.service.rejected) == 1


async def test_the_admin_token_is_refreshed_before_it_expires(fleet: Fleet) -> None:
    fleet.service.admin_ttl_s = 4  # exp is whole seconds: 3-4 s from now
    client = await fleet.client(refresh_margin_s=2.5)
    await client.ensure_scale_set("a", 1, LABELS)
    await asyncio.sleep(1.6)  # within the margin now, not yet expired
    await client.ensure_scale_set("a", 1, LABELS)
    assert client.service.admin_fetches == 2
    assert fleet.service.rejected == []  # refreshed ahead: no call was ever refused


async def test_a_server_error_is_retried_and_a_client_error_is_not(fleet: Fleet) -> None:
    client = await fleet.client()
    fleet.service.inject("GET", "_apis/runtime/runnerscalesets", 503, times=2)
    assert (await client.ensure_scale_set("a", 1, LABELS)).name == "a"
    fleet.service.inject("POST", r"_apis/runtime/runnerscalesets/\d+/generatejitconfig", 400)
    with pytest.raises(Exception, match="400") as caught:
        await client.generate_jitconfig(next(iter(fleet.service.scale_sets)), "r1")
    assert "ghs_" not in str(caught.value)
    assert "Bearer" not in str(caught.value)


# -- the listener -------------------------------------------------------------------------


async def test_a_job_is_acquired_and_run_by_one_jit_runner(fleet: Fleet) -> None:
    host = Host(free=2)
    async with listening(await fleet.client(), host) as (listener, _):
        scale_set = next(iter(fleet.service.scale_sets.values()))
        assert scale_set["name"] == "snapfleet-h1-gh"
        assert [label["name"] for label in scale_set["labels"]] == list(LABELS)
        rid = fleet.service.add_job(REPO, ["self-hosted", "linux"])
        await until(lambda: host.started, what="a runner")
        jit = host.started[0]
        assert jit.encoded_jit_config.reveal() == fleet.service.jit_configs[jit.runner_id]
        assert fleet.service.acquired_by() == {rid: scale_set["id"]}
        # The runner takes the job, runs it, and its VM ends: nothing more is started.
        assert fleet.service.take_job(jit.name) == rid
        await until(lambda: listener.intake.runners.get(jit.name) is proto.RunnerState.BUSY,
                    what="JobStarted")
        fleet.service.finish_job(rid)
        await until(lambda: jit.name not in listener.intake.runners, what="JobCompleted")
        host.runner_ended(jit.name)
        await asyncio.sleep(0.5)
        assert len(host.started) == 1
        queue = fleet.service.queues[scale_set["id"]]
        await until(lambda: all(m.deleted for m in queue), what="every message acknowledged")
        assert {json.loads(json.dumps(e))["messageType"] for m in queue for e in m.events} == {
            "JobAvailable", "JobAssigned", "JobStarted", "JobCompleted"}
        session = fleet.service.sessions[scale_set["id"]]
        assert session.max_capacity
        assert max(session.max_capacity) <= 2
        session_id = session.id
    # Shutdown deleted the session.
    assert fleet.service.sessions == {}
    assert fleet.service.sessions_deleted == [session_id]


async def test_never_acquires_beyond_the_hosts_capacity(fleet: Fleet) -> None:
    host = Host(free=1)
    async with listening(await fleet.client(), host) as (listener, _):
        jobs = [fleet.service.add_job(REPO, ["linux"]) for _ in range(3)]
        await until(lambda: host.started, what="a runner")
        await asyncio.sleep(1.0)  # several re-offers of the other two
        assert len(host.started) == 1
        assert sum(1 for owner in fleet.service.acquired_by().values() if owner) == 1
        assert all(len(asked) <= 1 for _, asked, _ in fleet.service.acquire_calls)
        # The runner finishes its job; the freed slot takes the next offer.
        first = host.started[0]
        done = fleet.service.take_job(first.name)
        fleet.service.finish_job(done)
        host.runner_ended(first.name)
        await until(lambda: len(host.started) == 2, what="a second runner")
        await asyncio.sleep(0.5)
        assert len(host.started) == 2
        assert sum(1 for owner in fleet.service.acquired_by().values() if owner) == 2
        assert listener.acquired_total == 2
        assert set(jobs) == set(fleet.service.jobs)


async def test_two_hosts_share_the_jobs_and_none_is_acquired_twice(fleet: Fleet) -> None:
    """Each host has its own scale set with the same labels; GitHub hands each job to one."""
    one, two = Host(free=3), Host(free=3)
    async with listening(await fleet.client(), one, owner="h1"), \
            listening(await fleet.client(), two, owner="h2"):
        assert len(fleet.service.sessions) == 2
        jobs = [fleet.service.add_job(REPO, ["self-hosted"]) for _ in range(5)]
        await until(lambda: len(one.started) + len(two.started) == 5, what="five runners")
        await asyncio.sleep(0.5)
        assert len(one.started) + len(two.started) == 5
        owners = fleet.service.acquired_by()
        assert all(owners[rid] is not None for rid in jobs)
        won = [rid for _, _, got in fleet.service.acquire_calls for rid in got]
        assert sorted(won) == sorted(jobs)  # each job acquired exactly once
        assert one.started
        assert two.started


async def test_an_expired_queue_token_refreshes_the_session(fleet: Fleet) -> None:
    host = Host(free=2)
    async with listening(await fleet.client(), host) as (listener, _):
        fleet.service.expire_queue_tokens()
        await until(lambda: any("messages" in r for r in fleet.service.rejected),
                    what="a poll refused")
        await asyncio.sleep(0.1)
        fleet.service.expire_queue_tokens()
        fleet.service.add_job(REPO, ["linux"])  # its acquire is refused once too
        await until(lambda: host.started, what="a runner after the refresh")
        assert listener.session is not None
        assert listener.session.refreshes >= 2
        assert any("acquirejobs" in r for r in fleet.service.rejected)
        assert fleet.service.sessions_deleted == []  # refreshed, not replaced


async def test_poll_and_acquire_failures_are_retried_without_losing_the_job(
    fleet: Fleet,
) -> None:
    host = Host(free=2)
    fleet.service.inject("GET", r"_apis/runtime/runnerscalesets/\d+/messages", 503, times=3)
    fleet.service.inject("POST", r"_apis/runtime/runnerscalesets/\d+/acquirejobs", 500,
                         times=FAST.max_attempts)
    async with listening(await fleet.client(), host):
        rid = fleet.service.add_job(REPO, ["linux"])
        await until(lambda: host.started, what="a runner despite the errors")
        await asyncio.sleep(0.5)
        assert len(host.started) == 1
        assert [got for _, _, got in fleet.service.acquire_calls if got] == [[rid]]


async def test_a_session_left_by_a_crash_is_deleted_and_replaced(
    fleet: Fleet, tmp_path: Path
) -> None:
    state = tmp_path / "scalesets.json"
    client = await fleet.client()
    async with listening(client, Host(1), state_file=state) as (listener, _stopping):
        crashed = listener.session
        assert crashed is not None
        assert crashed.session is not None
        stale_id = crashed.session.id
        assert json.loads(state.read_text()) == {str(crashed.scale_set_id): stale_id}
        # Crash: the process dies without closing its session.
        crashed.session = None
    assert fleet.service.sessions
    assert stale_id not in fleet.service.sessions_deleted
    # The next start closes the recorded session first instead of hitting 409.
    async with listening(await fleet.client(), Host(1), state_file=state) as (again, _):
        assert stale_id in fleet.service.sessions_deleted
        assert again.session is not None
        assert again.session.session is not None
        assert again.session.session.id != stale_id
    assert not any("sessions" in r for r in fleet.service.rejected)
    assert json.loads(state.read_text()) == {}


async def test_an_unknown_open_session_is_retried_until_it_lapses(fleet: Fleet) -> None:
    client = await fleet.client()
    scale_set = await client.ensure_scale_set("snapfleet-h1-gh", 1, LABELS)
    await MessageSession(client.service, scale_set.id, "old").create()  # never closed
    fleet.service.session_stale_s = 0.5
    async with listening(client, Host(1)) as (listener, _):
        assert listener.session is not None
        assert listener.session.session is not None
        assert listener.session.session.owner == "h1"
    conflicts = [r for r in fleet.service.requests if r[0] == "POST" and r[1].endswith(
        "/sessions")]
    assert len(conflicts) >= 2  # at least one 409 then success


async def test_shutdown_stops_a_long_poll_at_once_and_acquires_nothing_after(
    fleet: Fleet,
) -> None:
    fleet.service.poll_s = 30
    host = Host(free=2)
    async with listening(await fleet.client(), host) as (_listener, stopping):
        await asyncio.sleep(0.2)
        started = time.monotonic()
        stopping.set()
        fleet.service.add_job(REPO, ["linux"])  # offered as the host shuts down
    assert time.monotonic() - started < 3
    assert host.started == []
    assert fleet.service.acquire_calls == []
    assert fleet.service.sessions == {}


async def test_runners_that_take_no_job_back_the_profile_off(fleet: Fleet) -> None:
    health = ProfileHealth(BackoffPolicy(base_s=0.4, cap_s=1.0, unhealthy_after=2))
    host = Host(free=3)
    async with listening(await fleet.client(), host, health=health) as (listener, _):
        fleet.service.add_job(REPO, ["linux"])
        await until(lambda: host.started, what="a runner")
        host.runner_ended(host.started[0].name)  # the VM ended; GitHub saw no job start
        ended = time.monotonic()
        await until(lambda: len(host.started) == 2, what="a replacement after the pause")
        assert time.monotonic() - ended >= 0.35  # not at once
        host.runner_ended(host.started[1].name)
        assert health.failures_total["gh"] == 2
        assert "ended without a job" in listener.status()["unhealthy"]
        await until(lambda: len(host.started) == 3, what="a third runner")
        runner = host.started[2]
        fleet.service.take_job(runner.name)
        await until(lambda: listener.intake.runners.get(runner.name) is proto.RunnerState.BUSY,
                    what="JobStarted")
        host.runner_ended(runner.name)
        assert listener.status()["unhealthy"] is None  # a runner took a job: healthy again
