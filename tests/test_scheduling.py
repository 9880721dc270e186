"""Scheduling and recovery decisions, as tables (pure functions, no host access)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.config import load_settings
from runner.errors import ConfigError, InvalidStateError
from runner.gpu.config import GpuRequest
from runner.service.jobs import JobSpec, JobState, check_transition
from runner.service.recovery import LOST_JOB_REASON, Observed, plan
from runner.service.scheduler import (
    Resources,
    choose_profile,
    gpu_capacity,
    gpu_refusal,
    pick,
    plan_starts,
    refusal,
    room,
    wait_reason,
)

R1 = Resources(1, 512)
R4 = Resources(4, 4096)


@pytest.mark.parametrize(
    ("queue", "free", "slots", "expected"),
    [
        ([("a", R1), ("b", R1), ("c", R1)], Resources(2, 4096), 8, ["a", "b"]),
        ([("a", R1), ("b", R1), ("c", R1)], Resources(8, 8192), 2, ["a", "b"]),
        # A big job at the head is not overtaken by small ones behind it.
        ([("big", R4), ("s1", R1), ("s2", R1)], Resources(2, 8192), 8, []),
        ([("s1", R1), ("big", R4), ("s2", R1)], Resources(4, 8192), 8, ["s1"]),
        ([], Resources(8, 8192), 8, []),
        ([("g", Resources(1, 512, 1))], Resources(8, 8192, 0), 8, []),
    ],
)
def test_pick_is_strict_fifo_within_capacity(
    queue: list[tuple[str, Resources]], free: Resources, slots: int, expected: list[str]
) -> None:
    assert pick(queue, free, slots) == expected


SMALL, BIG = Resources(1, 512), Resources(4, 4096)


@pytest.mark.parametrize(("need", "free", "slots", "queued", "want"), [
    (SMALL, Resources(4, 8192), 8, [], 4),  # vCPUs run out first
    (SMALL, Resources(4, 8192), 2, [], 2),  # slots run out first
    (SMALL, Resources(4, 8192), 8, [SMALL, SMALL], 2),  # the queue goes first
    (SMALL, Resources(4, 8192), 3, [SMALL, SMALL, SMALL], 0),  # its slots too
    (SMALL, Resources(4, 8192), 8, [BIG], 0),  # a big job ahead takes it all
    (BIG, Resources(8, 8192), 8, [], 2),
    (BIG, Resources(3, 8192), 8, [], 0),  # never fits now
    (SMALL, Resources(4, 8192, 0), 0, [], 0),  # shutting down: no slots
])
def test_room_counts_what_fits_after_the_queue(
    need: Resources, free: Resources, slots: int, queued: list[Resources], want: int
) -> None:
    assert room(need, free, slots, queued) == want


def test_refusal_names_what_does_not_fit() -> None:
    assert refusal(R1, R4) is None
    reason = refusal(Resources(8, 512), R4)
    assert reason is not None
    assert "needs 8 vCPU" in reason


@pytest.fixture
def settings(tmp_path: Path) -> object:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[profiles.default]\n[profiles.big]\nvcpus = 4\nlabels = ['snapfleet', '4cpu']\n"
        "[profiles.gpu]\ngpus = 1\nlabels = ['snapfleet', 'gpu']\n"
    )
    return load_settings(cfg)


@pytest.mark.parametrize(
    ("profile", "labels", "expected"),
    [
        (None, [], "default"),
        ("big", [], "big"),
        (None, ["snapfleet", "4cpu"], "big"),
        (None, ["4cpu"], "big"),
        (None, ["gpu", "snapfleet"], "gpu"),
        (None, ["snapfleet"], "big"),  # first profile in config order serving all labels
    ],
)
def test_choose_profile(settings: object, profile: str | None, labels: list[str], expected: str
                        ) -> None:
    assert choose_profile(settings, profile, labels) == expected  # type: ignore[arg-type]


def test_choose_profile_refuses(settings: object) -> None:
    with pytest.raises(ConfigError, match="no profile serves labels"):
        choose_profile(settings, None, ["arm64"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        choose_profile(settings, "huge", [])  # type: ignore[arg-type]


RUN, STARTING, QUEUED = JobState.RUNNING, JobState.STARTING, JobState.QUEUED


@pytest.mark.parametrize(
    ("observed", "live_vms", "unfinished", "live_jobs", "kill", "nets", "dirs", "failed"),
    [
        # Fresh start after kill -9: everything on the host is an orphan, running jobs lost.
        (Observed(frozenset({"a", "b"}), frozenset({"a", "b"}), frozenset({"a"}), {"a": 10}),
         set(), {"j1": RUN, "j2": STARTING, "j3": QUEUED}, set(),
         {"a": 10}, {"a", "b"}, {"a", "b"}, ("j1", "j2")),
        # Steady state: everything is accounted for.
        (Observed(frozenset({"a"}), frozenset({"a"}), frozenset({"a"}), {"a": 10}),
         {"a"}, {"j1": RUN}, {"j1"}, {}, set(), set(), ()),
        # A VM the daemon no longer knows but whose netns survived (crash mid-teardown).
        (Observed(frozenset(), frozenset({"z"}), frozenset(), {}),
         {"a"}, {}, set(), {}, {"z"}, set(), ()),
        # A QEMU that escaped (no dir, no netns) is still killed.
        (Observed(qemu={"q": 77}), set(), {}, set(), {"q": 77}, set(), set(), ()),
        # Another process sharing the state dir (`snapfleet run` beside the daemon)
        # holds "c": alive, not ours to reclaim; "d" lost its owner.
        (Observed(frozenset({"c", "d"}), frozenset({"c", "d"}), frozenset({"c", "d"}),
                  {"c": 5, "d": 6}, owned=frozenset({"c"})),
         set(), {}, set(), {"d": 6}, {"d"}, {"d"}, ()),
    ],
)
def test_recovery_plan(observed: Observed, live_vms: set[str], unfinished: dict[str, JobState],
                       live_jobs: set[str], kill: dict[str, int], nets: set[str], dirs: set[str],
                       failed: tuple[str, ...]) -> None:
    p = plan(observed, live_vms, unfinished, live_jobs, leases=[])
    assert dict(p.kill) == kill
    assert set(p.networks) == nets
    assert set(p.dirs) == dirs
    assert p.fail_jobs == failed
    assert "daemon stopped" in LOST_JOB_REASON


def test_orphan_cgroups_are_removed_and_owned_ones_kept() -> None:
    observed = Observed(cgroups=frozenset({"a", "b", "c"}), owned=frozenset({"c"}))
    p = plan(observed, live_vms={"a"}, unfinished={}, live_jobs=set(), leases=[])
    assert p.cgroups == frozenset({"b"})


def test_stale_leases_are_released() -> None:
    p = plan(Observed(), live_vms={"a"}, unfinished={}, live_jobs=set(), leases=["a", "gone"])
    assert p.release_leases == frozenset({"gone"})


@pytest.mark.parametrize(
    ("old", "new", "ok"),
    [
        (QUEUED, STARTING, True), (QUEUED, RUN, False), (STARTING, RUN, True),
        (RUN, JobState.SUCCEEDED, True), (JobState.SUCCEEDED, RUN, False),
        (JobState.CANCELLED, JobState.FAILED, False), (QUEUED, JobState.CANCELLED, True),
    ],
)
def test_job_transitions(old: JobState, new: JobState, ok: bool) -> None:
    if ok:
        check_transition("j", old, new)
    else:
        with pytest.raises(InvalidStateError):
            check_transition("j", old, new)


@pytest.mark.parametrize(
    ("data", "keys"),
    [
        ({"script": "x", "scirpt": "y"}, {"scirpt"}),
        ({"script": "x", "timeout_s": -1}, {"timeout_s"}),
        ({}, {"job"}),
        ({"script": "x", "command": ["y"]}, {"job"}),
        ({"command": []}, {"job"}),
        ({"script": "x", "env": {"A": 1}}, {"env.A"}),
    ],
)
def test_bad_job_specs_name_the_field(data: dict[str, object], keys: set[str]) -> None:
    with pytest.raises(ConfigError) as info:
        JobSpec.parse(data)
    assert {k for k, _ in info.value.problems} == keys


G1 = Resources(1, 512, 1)
A100, H100 = "10de:20b0", "10de:2330"
UNITS = [("0000:01:00.0", A100), ("0000:02:00.0", H100), ("0000:03:00.0", A100)]


@pytest.mark.parametrize(
    ("queue", "units", "expected"),
    [
        # Any model: the first free units, each job its own.
        ([("a", G1, GpuRequest(1)), ("b", G1, GpuRequest(1))], UNITS,
         [("a", ("0000:01:00.0",)), ("b", ("0000:02:00.0",))]),
        # A model request skips units of other models.
        ([("h", G1, GpuRequest(1, H100)), ("a", G1, GpuRequest(1, A100))], UNITS,
         [("h", ("0000:02:00.0",)), ("a", ("0000:01:00.0",))]),
        # The head waits for its model; nothing behind it overtakes.
        ([("h", G1, GpuRequest(1, H100)), ("x", G1, GpuRequest(1))], UNITS[:1], []),
        ([("two", Resources(1, 512, 2), GpuRequest(2, A100))], UNITS,
         [("two", ("0000:01:00.0", "0000:03:00.0"))]),
        ([("plain", R1, None), ("g", G1, GpuRequest(1))], [], [("plain", ())]),
    ],
)
def test_plan_starts_hands_out_specific_free_units_fifo(
    queue: list[tuple[str, Resources, GpuRequest | None]], units: list[tuple[str, str]],
    expected: list[tuple[str, tuple[str, ...]]],
) -> None:
    assert plan_starts(queue, Resources(8, 8192, 3), 8, units) == expected


def test_gpu_capacity_and_refusal() -> None:
    assert gpu_capacity(0, 3) == 3  # unset: every device [gpu] hands out
    assert gpu_capacity(1, 3) == 1
    assert gpu_capacity(5, 3) == 3
    assert gpu_refusal(GpuRequest(1, H100), UNITS) is None
    assert gpu_refusal(GpuRequest(1), []) is None  # counts are refusal()'s business
    reason = gpu_refusal(GpuRequest(2, H100), UNITS)
    assert reason == "needs 2 GPU of model 10de:2330 but this host hands out 1 of that model"


def test_a_queued_job_is_told_what_it_waits_for() -> None:
    small, big = Resources(1, 512), Resources(4, 8192)
    queue = [("a", big, None), ("b", small, None), ("c", small, None)]
    free = Resources(2, 4096)
    assert wait_reason(queue, "c", free, 4) == "2 jobs ahead of it in the queue"
    assert wait_reason(queue, "b", free, 4) == "1 job ahead of it in the queue"
    assert wait_reason(queue, "a", free, 0) == (
        "every job slot is busy (capacity.max_concurrency)"
    )
    assert wait_reason(queue, "a", free, 4) == (
        "needs 4 vCPU / 8192 MiB / 0 GPU, and 2 / 4096 MiB / 0 are free until running jobs end"
    )
    gpu = [("g", Resources(1, 512, 1), GpuRequest(count=1, model="a100"))]
    assert wait_reason(gpu, "g", Resources(2, 4096, 1), 4, [("0000:01:00.0", "t4")]) == (
        "waiting for a free GPU (1 GPU of model a100)"
    )
    assert wait_reason(queue[1:], "b", free, 4) is None  # it starts on the next pass
    assert wait_reason(queue, "gone", free, 4) is None
