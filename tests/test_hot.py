"""The hot pool: clones restored before the job, that carry nothing from their wait."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

import pytest

from runner import compose
from runner.config import Profile, Settings
from runner.engine import Engine
from runner.execution import Command, Report, command_work
from runner.execution import run as run_job
from runner.snapshots import Snapshot
from tests.conftest import leftovers
from tests.test_pool import until

pytestmark = pytest.mark.vm

# What a job can see of the time before it: processes, files changed since the
# clone woke (the clock is the host's), and env. Both kinds of clone must agree.
PROBE = (
    "echo processes:; for p in /proc/[0-9]*; do c=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null); "
    '[ -n "$c" ] && echo "$c"; done | grep -v -e "^/bin/sh -c" -e "^tr " -e "^grep " '
    '-e "^sort" | sort; '
    "echo files:; find / -xdev -newermt @$SINCE -type f 2>/dev/null | sort; "
    "echo env:; env | cut -d= -f1 | grep -v -x -e PWD -e SHLVL -e _ | sort; "
    'echo "hostname=$(hostname)"'
)


def seen(output: str) -> str:
    """The probe's findings, minus the job's own script file (the agent names it at random)."""
    return re.sub(r"snapfleet-\w+\.sh", "snapfleet-SCRIPT.sh", output.split("hostname=")[0])


async def job(engine: Engine, profile: Profile, script: str, env: dict[str, str] | None = None
              ) -> tuple[Report, str]:
    out: list[bytes] = []
    work = command_work(Command(script=script, env=env or {}), lambda _s, d: out.append(d), 60)
    report = await run_job(engine, profile, work, timeout_s=60, note=lambda _n: None)
    return report, b"".join(out).decode()


@pytest.fixture
async def hot(engine: Engine, settings: Settings, snapshot: Snapshot
              ) -> AsyncIterator[Profile]:
    """The default profile with two hot clones kept."""
    profile = settings.profile().model_copy(update={"hot": 2})
    key = engine.hot_key(profile)
    engine.keep_hot(profile, snapshot)
    await until(lambda: engine.hot.stats()[key].idle == 2, "two hot clones", 120)
    yield profile
    engine.hot.set_target(key, snapshot, 0, engine.policy(profile))
    await until(lambda: engine.hot.held() == 0, "the hot pool to drain")


async def test_a_hot_clone_carries_nothing_from_its_wait(
    engine: Engine, settings: Settings, hot: Profile
) -> None:
    since = str(int(time.time()) - 120)  # before the hot clones were made
    fresh, fresh_out = await job(engine, settings.profile(), PROBE, {"SINCE": since})
    warmed, hot_out = await job(engine, hot, PROBE, {"SINCE": since})
    assert fresh.restored is not None
    assert not fresh.restored.hot
    assert warmed.restored is not None
    assert warmed.restored.hot
    assert warmed.outcome.exit_code == 0, hot_out
    # The job's own hostname, not the placeholder it waited under.
    assert f"hostname=snapfleet-{warmed.restored.vm_id}\n" in hot_out
    # Same processes, same files written since the clone woke, same env names as a
    # clone made for the job: the wait left nothing behind.
    assert "python3" in hot_out.split("files:")[0]  # the listing does see the agent
    assert seen(hot_out) == seen(fresh_out)


async def test_two_hot_clones_read_different_random_bytes(engine: Engine, hot: Profile) -> None:
    script = ("head -c 16 /dev/urandom | od -An -tx1; "
              "python3 -c 'import random, uuid; print(random.random(), uuid.uuid4())'")
    first, a = await job(engine, hot, script)
    second, b = await job(engine, hot, script)
    assert first.restored is not None
    assert first.restored.hot
    assert second.restored is not None
    assert second.restored.hot
    assert first.restored.vm_id != second.restored.vm_id
    lines_a, lines_b = a.splitlines(), b.splitlines()
    assert len(lines_a) == len(lines_b) == 2
    assert lines_a[0] != lines_b[0]  # the kernel's pool was reseeded at assignment
    assert lines_a[1] != lines_b[1]  # so were new processes' own generators


async def test_a_hot_job_is_much_faster_to_its_first_command_than_a_fresh_one(
    engine: Engine, settings: Settings, hot: Profile
) -> None:
    """Not a benchmark (bench/hot.py is): it shows the restore was done before the job."""
    fresh, _ = await job(engine, settings.profile(), "true")
    warmed, _ = await job(engine, hot, "true")
    assert fresh.restored is not None
    assert warmed.restored is not None
    assert warmed.restored.hot
    assert "assign" in warmed.restored.timings
    assert "load" not in warmed.restored.timings  # no snapshot was loaded for the job
    assert "load" in fresh.restored.timings


async def test_a_clone_hot_for_too_long_is_recycled(
    settings: Settings, snapshot: Snapshot, state_dir: object
) -> None:
    short = settings.model_copy(update={"vm": settings.vm.model_copy(
        update={"hot_max_age_s": 3.0})})
    profile = settings.profile().model_copy(update={"hot": 1})
    async with compose.engine(short) as engine:
        await engine.snapshot(profile, lambda _m: None)
        engine.keep_hot(profile, snapshot)
        key = engine.hot_key(profile)
        await until(lambda: engine.hot.stats()[key].idle == 1, "a hot clone", 120)
        first = next(iter(engine.hot._slots[key].idle))[0].vm_id
        await until(lambda: engine.hot.stats()[key].recycled >= 1, "the recycle", 60)
        await until(lambda: engine.hot.stats()[key].idle == 1, "a new hot clone", 120)
        second = next(iter(engine.hot._slots[key].idle))[0].vm_id
        assert first != second
        assert first not in engine.hypervisor.live
    assert not any(leftovers(settings.paths.state_dir).values())
