"""Commands that run or talk to the daemon: serve, submit, jobs, logs, cancel, status."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import tomllib

from runner.api.client import ApiClient
from runner.cli.engine_cmds import parse_env, settings_of
from runner.errors import ConfigError
from runner.execution import Outcome, exit_code
from runner.limits import check_depth, load_json
from runner.log import configure_logging
from runner.service.jobs import JobSpec, JobState, parse_submission


async def serve(args: argparse.Namespace) -> int:
    from runner import compose

    settings = settings_of(args)
    # JSON lines to stdout for journald (console output on a terminal).
    configure_logging(args.log_level if args.log_level != "warning" else "info", stream="stdout")
    await compose.daemon(settings).serve()
    return 0


def _client(args: argparse.Namespace) -> ApiClient:
    return ApiClient(settings_of(args).daemon.api_socket)


def read_spec(source: str) -> JobSpec:
    """A job spec from a TOML or JSON file, or from stdin with ``-``, checked here."""
    try:
        text = sys.stdin.read() if source == "-" else open(source).read()  # noqa: SIM115
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("job", f"cannot read {source}: {exc}") from None
    try:
        return JobSpec.parse(load_json(text))
    except ValueError as json_error:
        if text.lstrip().startswith("{"):  # a TOML document never does
            raise ConfigError("job", f"{source} is not valid JSON: {json_error}") from None
    try:
        data = tomllib.loads(text)
        check_depth(data)
    except RecursionError:
        raise ConfigError("job", f"{source}: TOML nested too deeply") from None
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError("job", f"{source} is neither valid JSON nor TOML: {exc}") from None
    return JobSpec.parse(data)


async def submit(args: argparse.Namespace) -> int:
    plain, secret = parse_env(args.env)
    data = read_spec(args.file).model_dump(mode="json", exclude_none=True)
    data["env"] = {**data.get("env", {}), **plain}
    spec, _ = parse_submission({**data, "secret_env": secret})  # checked before the daemon
    async with _client(args) as api:
        job = await api.submit(spec.model_dump(mode="json", exclude_none=True),
                               secret_env=secret)
        if not args.follow:
            print(job["id"])
            return 0
        print(f"snapfleet: job {job['id']} queued", file=sys.stderr)
        return await _follow(api, job["id"])


async def _follow(api: ApiClient, job_id: str) -> int:
    async for chunk in api.logs(job_id, follow=True):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    job = await api.job(job_id)
    while job["state"] in ("queued", "starting", "running"):
        await asyncio.sleep(0.2)
        job = await api.job(job_id)
    code = job["exit_code"]
    return exit_code(Outcome(JobState(job["state"]), exit_code=1 if code in (None, 0) else code))


async def jobs(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        rows = await api.jobs(limit=args.limit)
    print(f"{'ID':12}{'STATE':16}{'PROFILE':12}{'EXIT':>5}  {'AGE':>8}  NAME / REASON")
    now = time.time()
    for job in rows:
        exit_code = "" if job["exit_code"] is None else str(job["exit_code"])
        note = job["name"] or ""
        if job["reason"]:
            note = f"{note} ({job['reason']})" if note else job["reason"]
        print(f"{job['id']:12}{job['state']:16}{job['profile']:12}{exit_code:>5}  "
              f"{_age(now - job['created_at']):>8}  {note}")
    return 0


async def logs(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        if args.follow:
            return await _follow(api, args.job)
        async for chunk in api.logs(args.job):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    return 0


async def cancel(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        job = await api.cancel(args.job)
    print(f"{job['id']} {job['state']}")
    return 0


async def status(args: argparse.Namespace) -> int:
    async with _client(args) as api:
        body = await api.status()
    cap = body["capacity"]
    total, used = cap["total"], cap["used"]
    print(f"accepting jobs: {'yes' if body['accepting'] else 'no (shutting down)'}")
    print(f"capacity: {used['vcpus']}/{total['vcpus']} vCPU, "
          f"{used['memory_mib']}/{total['memory_mib']} MiB, {used['gpus']}/{total['gpus']} GPU, "
          f"{len(body['running'])}/{cap['max_concurrency']} jobs")
    print(f"running: {' '.join(body['running']) or '-'}")
    print(f"queued: {len(body['queued'])}")
    print(f"VMs: {len(body['vms'])}")
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


async def gitlab_executor(args: argparse.Namespace) -> int:
    from runner.forge import gitlab_executor as executor

    try:
        settings = settings_of(args)
    except ConfigError as exc:
        # gitlab-runner only understands its own exit codes.
        env = executor.ExecutorEnv(os.environ)
        print(f"Snapfleet: system failure: bad configuration: {exc}", file=sys.stderr)
        return env.system_failure
    return await executor.main(settings, args.action, args.args)
