"""Commands that are clients of the daemon: submit, jobs, logs, cancel, status, and the
GitLab executor's steps.

Short-lived processes, often one per job or per stage, so they import what they use
and no more: no event loop, no aiohttp (`runner.api.local` is a blocking client),
and only the settings they read (`runner.cli.client_settings`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib
from typing import TYPE_CHECKING

from runner.api.local import DaemonClient
from runner.cli import client_settings
from runner.cli.args import parse_env
from runner.error_root import ConfigError

if TYPE_CHECKING:
    from runner.service.jobs import JobSpec

ACTIVE = ("queued", "starting", "running")


def _client(args: argparse.Namespace) -> DaemonClient:
    return DaemonClient(client_settings.load(args.config).api_socket)


def read_spec(source: str) -> JobSpec:
    """A job spec from a TOML or JSON file, or from stdin with ``-``, checked here."""
    from runner.limits import check_depth, load_json
    from runner.service.jobs import JobSpec

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


def submit(args: argparse.Namespace) -> int:
    from runner.service.jobs import parse_submission

    plain, secret = parse_env(args.env)
    data = read_spec(args.file).model_dump(mode="json", exclude_none=True)
    data["env"] = {**data.get("env", {}), **plain}
    spec, _ = parse_submission({**data, "secret_env": secret})  # checked before the daemon
    api = _client(args)
    job = api.submit(spec.model_dump(mode="json", exclude_none=True), secret_env=secret)
    if not args.follow:
        print(job["id"])
        return 0
    print(f"snapfleet: job {job['id']} queued", file=sys.stderr)
    return _follow(api, job["id"])


def _follow(api: DaemonClient, job_id: str) -> int:
    for chunk in api.logs(job_id, follow=True):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    job = api.job(job_id)
    while job["state"] in ACTIVE:
        time.sleep(0.2)
        job = api.job(job_id)
    from runner.execution import Outcome, exit_code
    from runner.service.jobs import JobState

    code = job["exit_code"]
    return exit_code(Outcome(JobState(job["state"]), exit_code=1 if code in (None, 0) else code))


def jobs(args: argparse.Namespace) -> int:
    rows = _client(args).jobs(limit=args.limit)
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


def logs(args: argparse.Namespace) -> int:
    api = _client(args)
    if args.follow:
        return _follow(api, args.job)
    for chunk in api.logs(args.job):
        sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
    return 0


def cancel(args: argparse.Namespace) -> int:
    job = _client(args).cancel(args.job)
    print(f"{job['id']} {job['state']}")
    return 0


def status(args: argparse.Namespace) -> int:
    body = _client(args).status()
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


def gitlab_executor(args: argparse.Namespace) -> int:
    from runner.forge import gitlab_executor as executor

    try:
        settings = client_settings.load(args.config)
    except ConfigError as exc:
        # gitlab-runner only understands its own exit codes.
        env = executor.ExecutorEnv(os.environ)
        print(f"Snapfleet: system failure: bad configuration: {exc}", file=sys.stderr)
        return env.system_failure
    return executor.main(settings, args.action, args.args)
