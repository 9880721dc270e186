"""GitHub Actions: job event received → runner process started in the guest.

A fake GitHub (tests/fake_github.py, schema-checked) and the real daemon.
Webhook path: signed `queued` deliveries rotate between a profile with a hot
pool, one with a warm pool and one without, ≥20 each; the clock starts as the delivery is
posted. Scale-set path (a second daemon, `mode = "scaleset"`, the same warm
profile, the fake scale-set service of tests/fake_scaleset.py): the clock
starts when the fake hands the job's `JobAvailable` message to the daemon's
long poll, and runs through acquire, `JobAssigned`, the JIT registration and
the VM. Either clock stops at the first line the (stand-in) runner prints
inside its VM. ``--jit-delay-ms`` makes the fake take that long to answer each
scale-set JIT registration (GitHub's round trip; the VM restores meanwhile), and
``--scaleset-only`` skips the webhook path.

    .venv/bin/python -m bench.github [--runs 20] [--jit-delay-ms 0] [--scaleset-only] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench._daemon import percentiles, running_daemon
from bench._stats import log, print_table
from runner.api.client import ApiClient
from runner.images import build_image
from tests.fake_github import FakeGitHub
from tests.fake_scaleset import FakeScaleSetService
from tests.test_github_webhook import job_payload, sign
from tests.test_images import standin_runner_tarball

REPO = "octo-org/hello"
SECRET = b"bench-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def post(url: str, action: str, job_id: int, labels: list[str],
               runner: str | None = None) -> None:
    payload = job_payload(action)
    payload["workflow_job"].update(id=job_id, labels=labels, runner_name=runner)
    body = json.dumps(payload).encode()
    headers = {"X-GitHub-Event": "workflow_job", "X-GitHub-Delivery": os.urandom(8).hex(),
               "X-Hub-Signature-256": sign(body, SECRET), "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as r:
        assert r.status == 202, r.status


async def one(api: ApiClient, url: str, fake: FakeGitHub, job_id: int, labels: list[str]
              ) -> float:
    known = {j["id"] for j in await api.jobs(limit=1000)}
    issued = set(fake.jit_configs)
    started = time.monotonic()
    await post(url, "queued", job_id, labels)
    while True:  # the daemon job of the new runner
        fresh = [j for j in await api.jobs(limit=1000) if j["id"] not in known]
        if fresh:
            break
        await asyncio.sleep(0.005)
    while True:  # the VM is queued before its runner is registered
        new = set(fake.jit_configs) - issued
        if new:
            break
        await asyncio.sleep(0.005)
    new_runner = next(iter(new))
    name = next(r["name"] for r in fake.runners[REPO].values() if r["id"] == new_runner)
    await post(url, "in_progress", job_id, labels, runner=name)  # as GitHub would
    async for chunk in api.logs(fresh[0]["id"], follow=True):
        if b"jit ok" in chunk:
            return (time.monotonic() - started) * 1000
    raise RuntimeError(f"runner job {fresh[0]['id']} never started its runner")


async def one_scaleset(api: ApiClient, service: FakeScaleSetService, labels: list[str]
                       ) -> float:
    """One job through the scale set: offered, acquired, its runner started in a VM."""
    known = set(service.registered)
    rid = service.add_job(REPO, labels)
    while True:  # the runner registered for it (the fake runs on this loop)
        fresh = [n for n in service.registered if n not in known]
        if fresh:
            break
        await asyncio.sleep(0.005)
    name = fresh[0]
    service.take_job(name)  # as GitHub would once the runner connects
    while True:
        mine = [j for j in await api.jobs(limit=1000) if j["name"] == f"github runner {name}"]
        if mine:
            break
        await asyncio.sleep(0.005)
    elapsed = None
    async for chunk in api.logs(mine[0]["id"], follow=True):
        if elapsed is None and b"jit ok" in chunk:
            elapsed = (time.monotonic() - service.delivered_at[rid]) * 1000
    service.finish_job(rid)  # the runner's VM ended with its job
    if elapsed is None:
        raise RuntimeError(f"runner job {mine[0]['id']} never started its runner")
    return elapsed


async def bench_scaleset(runs: int, cache_dir: Path, log: Any, tarball: Path,
                         jit_delay_s: float = 0.0) -> list[float]:
    github = FakeGitHub(prefix="/api/v3")
    await github.start()
    github.add_token("ghs_bench")
    service = FakeScaleSetService(github)
    service.jit_delay_s = jit_delay_s

    def toml(_root: Path) -> str:
        return f"""
[github]
mode = "scaleset"
api_url = "{github.url}"
scopes = ["octo-org"]
token = "ghs_bench"
host = "bench"
[profiles.gh-warm]
image = "github-runner"
labels = ["self-hosted", "warm"]
warm = 2
"""

    times: list[float] = []
    try:
        with running_daemon(cache_dir, 4, log, extra_toml=toml,
                            env={"SNAPFLEET_RUNNER_TARBALL": str(tarball)}) as (root, _proc):
            async with ApiClient(root / "api.sock") as api:
                await one_scaleset(api, service, ["self-hosted", "warm"])  # snapshot, pool
                await asyncio.sleep(8)
                for i in range(runs):
                    times.append(await one_scaleset(api, service, ["self-hosted", "warm"]))
                    await asyncio.sleep(1.0)  # refill
                    log(f"scale set run {i + 1}/{runs}: {times[-1]:.0f} ms")
    finally:
        await github.close()
    assert not github.violations, github.violations
    assert not service.violations, service.violations
    return times


async def bench(runs: int, cache_dir: Path, log: Any, *, jit_delay_s: float = 0.0,
                scaleset_only: bool = False) -> dict[str, Any]:
    tarball = standin_runner_tarball(cache_dir / "test-inputs")
    os.environ["SNAPFLEET_RUNNER_TARBALL"] = str(tarball)
    await build_image("github-runner", cache_dir=cache_dir, progress=log)
    if scaleset_only:
        scaleset = await bench_scaleset(runs, cache_dir, log, tarball, jit_delay_s)
        return {"scaleset_ms": percentiles(scaleset)}
    fake = FakeGitHub(prefix="/api/v3")
    await fake.start()
    fake.add_token("ghs_bench")
    port = free_port()

    def toml(_root: Path) -> str:
        return f"""
[github]
api_url = "{fake.url}"
scopes = ["{REPO}"]
token = "ghs_bench"
webhook_secret = "{SECRET.decode()}"
webhook_listen = "127.0.0.1:{port}"
reconcile_interval_s = 5
host = "bench"
[profiles.gh-hot]
image = "github-runner"
labels = ["self-hosted", "hot"]
hot = 2
[profiles.gh-warm]
image = "github-runner"
labels = ["self-hosted", "warm"]
warm = 2
[profiles.gh-cold]
image = "github-runner"
labels = ["self-hosted", "cold"]
"""

    url = f"http://127.0.0.1:{port}/webhooks/github"
    times: dict[str, list[float]] = {"hot": [], "warm": [], "cold": []}
    try:
        with running_daemon(cache_dir, 4, log, extra_toml=toml,
                            env={"SNAPFLEET_RUNNER_TARBALL": str(tarball)}) as (root, _proc):
            async with ApiClient(root / "api.sock") as api:
                await one(api, url, fake, 1, ["self-hosted", "cold"])  # snapshot on first use
                await asyncio.sleep(8)  # the pools fill (after their snapshot)
                kinds = list(times)
                for i in range(runs):
                    for n, kind in enumerate(kinds[i % 3:] + kinds[:i % 3]):
                        job_id = 100 + 3 * i + n
                        times[kind].append(await one(api, url, fake, job_id,
                                                     ["self-hosted", kind]))
                        await asyncio.sleep(1.0)  # refill
                    log(f"run {i + 1}/{runs}: " + ", ".join(
                        f"{k} {v[-1]:.0f} ms" for k, v in times.items()))
    finally:
        await fake.close()
    assert not fake.violations, fake.violations
    scaleset = await bench_scaleset(runs, cache_dir, log, tarball, jit_delay_s)
    return {"webhook_to_runner_ms": {"hot_pool": percentiles(times["hot"]),
                                     "warm_pool": percentiles(times["warm"]),
                                     "no_pool": percentiles(times["cold"])},
            "scaleset_ms": percentiles(scaleset)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/snapfleet"))
    parser.add_argument("--jit-delay-ms", type=float, default=0.0)
    parser.add_argument("--scaleset-only", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(bench(args.runs, args.cache_dir,
                               log,
                               jit_delay_s=args.jit_delay_ms / 1000,
                               scaleset_only=args.scaleset_only))
    if args.json:
        print(json.dumps(result))
        return
    rows = {f"webhook, {k.replace('_', ' ')}": r
            for k, r in result.get("webhook_to_runner_ms", {}).items()}
    rows["scale set message, warm pool"] = result["scaleset_ms"]
    print_table("event → runner started", rows.items())


if __name__ == "__main__":
    main()
