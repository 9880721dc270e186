"""GitHub reconcile decisions as tables (pure, no forge, no VMs)."""

from __future__ import annotations

import pytest

from runner.forge.github.reconcile import LiveVM, Plan, RoutedJob, Teardown, plan, runner_prefix
from runner.forge.github.types import Runner

PREFIX = runner_prefix("snapfleet", "h1")
NOW = 10_000.0
IDLE = 600.0


def job(job_id: int, profile: str | None = "cpu") -> RoutedJob:
    return RoutedJob(job_id, profile)


def gh(rid: int, name: str, status: str = "online", busy: bool = False) -> Runner:
    return Runner(rid, f"{PREFIX}{name}", status, busy, ("self-hosted",))


def vm(name: str, profile: str = "cpu", age: float = 10.0, took: bool = False) -> LiveVM:
    return LiveVM(f"vm-{name}", f"{PREFIX}{name}", profile, NOW - age, took)


def teardown(name: str, runner_id: int | None) -> Teardown:
    return Teardown(f"vm-{name}", f"{PREFIX}{name}", runner_id)


CASES: list[tuple[str, list[RoutedJob], list[Runner], list[LiveVM], Plan]] = [
    ("nothing to do", [], [], [], Plan()),
    ("one queued job, no runner", [job(1)], [], [], Plan(start={"cpu": 1})),
    (
        "queued jobs per profile",
        [job(1), job(2), job(3, "gpu")],
        [],
        [],
        Plan(start={"cpu": 2, "gpu": 1}),
    ),
    ("jobs no profile serves are not ours", [job(1, None)], [], [], Plan()),
    (
        "a booting VM (not yet registered online) covers one job",
        [job(1), job(2)],
        [gh(7, "a", status="offline")],
        [vm("a")],
        Plan(start={"cpu": 1}),
    ),
    (
        "an idle runner of the same profile takes any queued job",
        [job(1)],
        [gh(7, "a")],
        [vm("a")],
        Plan(),
    ),
    (
        "an idle runner of another profile does not count",
        [job(1, "gpu")],
        [gh(7, "a")],
        [vm("a", "cpu")],
        Plan(start={"gpu": 1}),
    ),
    (
        "a runner that took a job (VM says so) is not available",
        [job(1)],
        [gh(7, "a")],
        [vm("a", took=True)],
        Plan(start={"cpu": 1}),
    ),
    (
        "a runner GitHub shows busy is not available, even before the VM reports",
        [job(1)],
        [gh(7, "a", busy=True)],
        [vm("a")],
        Plan(start={"cpu": 1}),
    ),
    (
        "more idle runners than jobs: start nothing",
        [job(1)],
        [gh(7, "a"), gh(8, "b")],
        [vm("a"), vm("b")],
        Plan(),
    ),
    (
        "offline registration with no VM is deleted",
        [],
        [gh(7, "a", status="offline")],
        [],
        Plan(delete_runners=(7,)),
    ),
    (
        "online registration with no VM is left alone (it will go offline)",
        [],
        [gh(7, "a")],
        [],
        Plan(),
    ),
    (
        "other hosts' and other fleets' runners are never touched",
        [],
        [
            Runner(1, "snapfleet-h2-x", "offline", False, ()),
            Runner(2, "laptop", "offline", False, ()),
            Runner(3, "snapfleet-h10-x", "offline", False, ()),
        ],
        [],
        Plan(),
    ),
    (
        "idle past the limit: deregister then destroy, and start a replacement if needed",
        [job(1)],
        [gh(7, "a")],
        [vm("a", age=IDLE)],
        Plan(start={"cpu": 1}, destroy_vms=(teardown("a", 7),)),
    ),
    (
        "idle past the limit with no registration listed",
        [],
        [],
        [vm("a", age=IDLE + 1)],
        Plan(destroy_vms=(teardown("a", None),)),
    ),
    (
        "a VM whose runner took a job is never destroyed for idling",
        [],
        [gh(7, "a", busy=True), gh(8, "b")],
        [vm("a", age=IDLE * 10), vm("b", age=IDLE * 10, took=True)],
        Plan(),
    ),
    (
        "just under the limit stays",
        [],
        [gh(7, "a")],
        [vm("a", age=IDLE - 1)],
        Plan(),
    ),
    (
        "an offline registration with an idle-expired VM is torn down once, not also deleted",
        [],
        [gh(7, "a", status="offline")],
        [vm("a", age=IDLE)],
        Plan(destroy_vms=(teardown("a", 7),)),
    ),
]


@pytest.mark.parametrize(
    ("queued", "runners", "vms", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan(
    queued: list[RoutedJob], runners: list[Runner], vms: list[LiveVM], expected: Plan
) -> None:
    got = plan(queued=queued, runners=runners, vms=vms, now=NOW, idle_limit_s=IDLE, prefix=PREFIX)
    assert dict(got.start) == dict(expected.start)
    assert got.delete_runners == expected.delete_runners
    assert got.destroy_vms == expected.destroy_vms


def test_plan_is_immutable() -> None:
    got = plan(queued=[job(1)], runners=[], vms=[], now=NOW, idle_limit_s=IDLE, prefix=PREFIX)
    with pytest.raises(TypeError):
        got.start["cpu"] = 5  # type: ignore[index]


def test_prefix() -> None:
    assert runner_prefix("snapfleet", "h1") == "snapfleet-h1-"
