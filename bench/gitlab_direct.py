"""GitLab jobs, direct source vs custom executor: job available → its first output.

One daemon serves both, with a hot profile (``hot = 2``) for each path. Runs
are interleaved and each starts with the pools full again.

- **direct**: the daemon polls a fake GitLab (``tests.fake_gitlab``, in this
  process, long polling as Workhorse does, trace interval 3 s as GitLab's
  default). Timed from the job being enqueued on the fake to the fake holding
  the first trace bytes the job's VM produced (the script's first section,
  ``direct_ms``); also to the trace's very first bytes, the runner's header
  written before the VM (``direct_first_bytes_ms``), and to the job's own
  ``echo`` after the generated script's preamble (``direct_job_output_ms``).
- **custom executor**: what gitlab-runner would run once it holds the job
  (``bench.gitlab_prepare.step``): ``config``, ``prepare``, then ``run`` of a
  ``build_script`` that echoes, timed to that step's exit with its output
  (``custom_executor_ms``). A lower bound: it leaves out gitlab-runner's own
  poll, its trace interval and the stages it runs before ``build_script``.

    .venv/bin/python -m bench.gitlab_direct [--runs 20] [--json]

``--json``: last line ``{"direct_ms": {"p50", "p95", "n"}, "custom_executor_ms": {…},
"direct_first_bytes_ms": {…}, "direct_job_output_ms": {…}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from bench._daemon import percentiles, running_daemon
from bench._stats import log, print_table
from bench.gitlab_prepare import pools_full, step
from runner.api.local import DaemonClient
from tests.fake_gitlab import FakeGitLab, make_job, variable

PROFILE = "hot"
FROM_VM = b":prepare_script\r"
"""The generated script's first output: the job is running in its VM."""
OUTPUT = b"\nready-from-job\n"


def extra_toml(fake_url: str) -> Any:
    def toml(root: Path) -> str:
        token = root / "runner-token"
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("glrt-fake-runner\n")
        return (f"[[gitlab.runners]]\nurl = \"{fake_url}\"\nrunner_id = 1\n"
                f"token_file = \"{token}\"\ntags = [\"{PROFILE}\"]\ncheck_interval_s = 1\n"
                f"[profiles.{PROFILE}]\nhot = 2\nlabels = [\"{PROFILE}\"]\n")

    return toml


async def direct_once(fake: FakeGitLab, job_id: int) -> tuple[float, float, float]:
    """ms to the first trace bytes, to the VM's first, to the job's own echo."""
    payload = make_job(job_id, script=["echo ready-from-job"],
                       variables=[variable("GIT_STRATEGY", "none")])
    started = time.monotonic()
    job = await fake.enqueue(payload)
    first = vm = output = None
    deadline = started + 300
    while output is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id}: no output; trace {bytes(job.trace)[-500:]!r}")
        if first is None and job.trace:
            first = (time.monotonic() - started) * 1000
        if vm is None and FROM_VM in job.trace:
            vm = (time.monotonic() - started) * 1000
        if OUTPUT in job.trace:
            output = (time.monotonic() - started) * 1000
        await asyncio.sleep(0.002)
    while job.status != "success":
        if time.monotonic() > deadline or job.status == "failed":
            raise RuntimeError(f"job {job_id} ended {job.status}: {bytes(job.trace)[-800:]!r}")
        await asyncio.sleep(0.05)
    return first or output, vm or output, output


def custom_once(config: Path, job_id: int, script: Path) -> float:
    started = time.monotonic()
    step(config, "config", job_id, PROFILE)
    step(config, "prepare", job_id, PROFILE)
    _, done = step(config, "run", job_id, PROFILE, str(script), "build_script")
    took = (time.monotonic() - started) * 1000
    if "ready-from-job" not in done.stdout:
        raise RuntimeError(f"run printed {done.stdout!r}: {done.stderr}")
    step(config, "cleanup", job_id, PROFILE)
    return took


async def bench(runs: int, cache_dir: Path, log: Any) -> dict[str, Any]:
    fake = FakeGitLab(long_poll_s=30, update_interval=3)
    await fake.start()
    direct: list[float] = []
    first_bytes: list[float] = []
    job_output: list[float] = []
    custom: list[float] = []
    # The custom executor's job uses no artifacts: its image needs no gitlab-runner helper.
    allowed = {"SNAPFLEET_GITLAB__ALLOWED_PROFILES": json.dumps(["default", PROFILE]),
               "SNAPFLEET_GITLAB__REQUIRE_HELPER": "false"}
    try:
        with running_daemon(cache_dir, 2, log, extra_toml=extra_toml(fake.url),
                            env=allowed) as (root, _proc):
            config = root / "config.toml"
            script = root / "build_script"
            script.write_text("#!/usr/bin/env bash\necho ready-from-job\n")
            api = DaemonClient(root / "api.sock")
            await asyncio.to_thread(pools_full, api, 600)
            await direct_once(fake, 10_000)  # one of each first: caches, bytecode
            await asyncio.to_thread(custom_once, config, 10_000, script)
            for i in range(runs):
                order = ("direct", "custom") if i % 2 == 0 else ("custom", "direct")
                for which in order:
                    await asyncio.to_thread(pools_full, api)
                    if which == "direct":
                        head, vm, out = await direct_once(fake, i + 1)
                        first_bytes.append(head)
                        direct.append(vm)
                        job_output.append(out)
                    else:
                        custom.append(await asyncio.to_thread(custom_once, config, i + 1,
                                                              script))
                log(f"run {i + 1}/{runs}: direct {direct[-1]:.0f} ms,"
                    f" custom executor {custom[-1]:.0f} ms")
    finally:
        await fake.stop()
    if fake.violations:
        raise RuntimeError(f"requests outside GitLab's shapes: {fake.violations[:3]}")
    return {"direct_ms": percentiles(direct), "custom_executor_ms": percentiles(custom),
            "direct_first_bytes_ms": percentiles(first_bytes),
            "direct_job_output_ms": percentiles(job_output)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/snapfleet"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()


    result = asyncio.run(bench(args.runs, args.cache_dir, log))
    print_table("", [(label, result[key]) for label, key in (
        ("direct: available → VM's first bytes", "direct_ms"),
        ("direct: available → first trace bytes", "direct_first_bytes_ms"),
        ("direct: available → job's echo", "direct_job_output_ms"),
        ("custom executor: config → run output", "custom_executor_ms"))])
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
