"""Jobs are checked where they enter: a job the agent could not carry or start is refused
with its reason (API 4xx, CLI exit 125), never given a VM; a job's own failure to start
(no such workdir or program) is `failed`, not `system_failure`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from runner.api.client import ApiClient
from runner.errors import ConfigError
from runner.limits import MAX_JOB_BYTES, MAX_JSON_DEPTH, MAX_TIMEOUT_S, load_json
from runner.service.jobs import ExecRequest, JobSpec
from tests.daemons import DaemonProcess, wait_terminal

SNAPFLEET = [sys.executable, "-m", "runner.cli"]
BIG_SCRIPT = "echo " + "x" * int(3.9 * 2**20)  # under the API's 4 MiB body limit

# (spec, field, reason): what each bad spec is refused for.
BAD_SPECS: list[tuple[dict[str, Any], str, str]] = [
    ({"script": "true", "env": {"A": "one\x00two"}}, "env.A", "NUL byte"),
    ({"script": "true", "env": {"A\x00B": "1"}}, "env.A\\0B.[key]", "NUL byte"),
    ({"command": ["echo", "a\x00b"]}, "command.1", "NUL byte"),
    ({"script": "echo \x00"}, "script", "NUL byte"),
    ({"script": "true", "workdir": "/tmp\x00"}, "workdir", "NUL byte"),
    ({"script": "true", "env": {"A=B": "1"}}, "env.A=B.[key]", "must not contain '='"),
    ({"script": "true", "env": {"": "1"}}, "env..[key]", "must not be empty"),
    ({"script": "true", "timeout_s": 1e300}, "timeout_s", "less than or equal to 604800"),
    ({"script": "true", "timeout_s": float("inf")}, "timeout_s", "finite number"),
    ({"script": "true", "timeout_s": float("nan")}, "timeout_s", "finite number"),
    ({"script": "true", "timeout_s": 0}, "timeout_s", "greater than 0"),
    ({"script": BIG_SCRIPT}, "job", f"the limit is {MAX_JOB_BYTES} bytes"),
    ({"command": ["echo"] + ["y" * 1000] * 1000}, "job", f"the limit is {MAX_JOB_BYTES} bytes"),
    # Escapes count at their encoded size: 200 Ki control characters are 1.2 MB as sent.
    ({"script": "\x01" * 200 * 1024}, "job", f"the limit is {MAX_JOB_BYTES} bytes"),
    ({"script": "true", "env": {"BIG": "z" * MAX_JOB_BYTES}}, "job", "limit"),
]


@pytest.mark.parametrize(("spec", "field", "reason"), BAD_SPECS, ids=range(len(BAD_SPECS)))
def test_bad_specs_are_refused_naming_field_and_reason(
    spec: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        JobSpec.parse(spec)
    assert info.value.problems[0][0] == field
    assert reason in info.value.problems[0][1]
    assert "\x00" not in str(info.value)


@pytest.mark.parametrize("spec", [
    {"script": "true", "timeout_s": MAX_TIMEOUT_S, "env": {"npm_config_//r.example/:_auth": "t"}},
    {"command": ["sh", "-c", "echo é ünïcode"], "workdir": "/srv", "timeout_s": 0.5},
])
def test_good_specs_pass(spec: dict[str, Any]) -> None:
    JobSpec.parse(spec)


def test_the_agent_size_limit_is_exact() -> None:
    overhead = len(json.dumps({"argv": None, "script": "", "env": {}, "cwd": None},
                              separators=(",", ":")))
    JobSpec.parse({"script": "x" * (MAX_JOB_BYTES - overhead)})
    with pytest.raises(ConfigError, match="limit"):
        JobSpec.parse({"script": "x" * (MAX_JOB_BYTES - overhead + 1)})


@pytest.mark.parametrize(("request_", "reason"), [
    ({"script": "echo \x00"}, "NUL byte"),
    ({"script": "true", "env": {"K=V": "1"}}, "'='"),
    ({"script": "true", "cwd": "/\x00"}, "NUL byte"),
    ({"script": BIG_SCRIPT}, "limit"),
])
def test_stage_requests_are_checked_like_jobs(request_: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        ExecRequest.parse(request_)


@pytest.mark.parametrize(("text", "reason"), [
    ("[" * 100_000 + "]" * 100_000, f"nested deeper than {MAX_JSON_DEPTH}"),
    ('{"a":' * (MAX_JSON_DEPTH + 1) + "1" + "}" * (MAX_JSON_DEPTH + 1),
     f"nested deeper than {MAX_JSON_DEPTH}"),
    ('{"script": "true", "timeout_s": Infinity}', "Infinity is not a JSON value"),
    ('{"timeout_s": NaN}', "NaN is not a JSON value"),
    ('{"script": ', "Expecting value"),
])
def test_load_json_refuses_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        load_json(text)


def test_load_json_takes_nesting_up_to_the_limit() -> None:
    depth = MAX_JSON_DEPTH
    assert load_json("[" * depth + "]" * depth) is not None


# --- the CLI ---------------------------------------------------------------


def _cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "SNAPFLEET_PATHS__STATE_DIR": str(tmp_path / "state"),
           "SNAPFLEET_DAEMON__API_SOCKET": str(tmp_path / "no-daemon.sock")}
    return subprocess.run([*SNAPFLEET, *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize(("spec_text", "message"), [
    ('{"script": "true", "env": {"A": "x\\u0000y"}}', "env.A: Value error, must not contain a NUL"),
    ('{"script": "true", "timeout_s": Infinity}', "Infinity is not a JSON value"),
    ('script = "true"\ntimeout_s = inf\n', "timeout_s: Input should be a finite number"),
    ('script = "true"\n[env]\n"A=B" = "1"\n', "must not contain '='"),
    ('{"x":' * 100_000, f"nested deeper than {MAX_JSON_DEPTH}"),
    ('script = "true"\nx = ' + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
])
def test_submit_refuses_a_bad_spec_before_reaching_the_daemon(
    tmp_path: Path, spec_text: str, message: str
) -> None:
    spec = tmp_path / "job.txt"
    spec.write_text(spec_text)
    done = _cli("submit", str(spec), tmp_path=tmp_path)
    assert done.returncode == 125, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert "cannot reach the daemon" not in done.stderr  # refused here, not by the API


@pytest.mark.parametrize(("args", "message"), [
    (["--timeout", "inf"], "--timeout: Input should be a finite number"),
    (["--timeout", "1e300"], "--timeout: Input should be less than or equal to 604800"),
    (["--", "echo", *["y" * 100_000] * 12], f"the limit is {MAX_JOB_BYTES} bytes"),
])
def test_run_refuses_a_bad_job_before_any_vm(
    tmp_path: Path, args: list[str], message: str
) -> None:
    if args[0] != "--":
        args = [*args, "--", "true"]
    done = _cli("run", *args, tmp_path=tmp_path)
    assert done.returncode == 125, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "state" / "vms").exists()


# --- a real daemon ------------------------------------------------------------

API_CASES: list[tuple[bytes, int, str]] = [
    (json.dumps({"script": "true", "env": {"A": "x\x00"}}).encode(), 422, "NUL byte"),
    (json.dumps({"script": "true", "env": {"A\x00": "x"}}).encode(), 422, "NUL byte"),
    (json.dumps({"command": ["true\x00"]}).encode(), 422, "NUL byte"),
    (json.dumps({"script": "true", "env": {"A=B": "x"}}).encode(), 422, "'='"),
    (b'{"script": "true", "timeout_s": 1e300}', 422, "less than or equal to 604800"),
    (b'{"script": "true", "timeout_s": Infinity}', 400, "Infinity is not a JSON value"),
    (json.dumps({"script": BIG_SCRIPT}).encode(), 422, f"the limit is {MAX_JOB_BYTES} bytes"),
    (b"[" * 100_000 + b"]" * 100_000, 400, f"nested deeper than {MAX_JSON_DEPTH}"),
    (b'{"script": "true", "env": ' + b'{"a":' * 100 + b"1" + b"}" * 101, 400, "nested deeper"),
]


@pytest.mark.vm
async def test_api_refuses_bad_jobs_with_4xx_and_starts_nothing(daemon: DaemonProcess) -> None:
    connector = aiohttp.UnixConnector(path=str(daemon.api))
    async with aiohttp.ClientSession(connector=connector) as http:
        for body, status, reason in API_CASES:
            async with http.post("http://snapfleet/v1/jobs", data=body,
                                 headers={"Content-Type": "application/json"}) as resp:
                text = await resp.text()
                assert resp.status == status, (body[:80], text[:500])
                assert reason in json.loads(text)["error"] + text, text[:500]
                assert "Traceback" not in text
        # The lease routes (GitLab's executor) parse with the same guard.
        async with http.post("http://snapfleet/v1/leases", data=b"[" * 100_000) as resp:
            assert resp.status == 400
        for bad in ({"key": "gl:k", "timeout_s": 1e300}, {"key": "gl:k", "wait_s": -1},
                    {"key": "gl:k", "wait_s": "soon"}, {"key": "gl:k", "wait_s": 301},
                    {"key": "gl:k", "wait_s": True}):
            async with http.post("http://snapfleet/v1/leases", data=json.dumps(bad)) as resp:
                assert resp.status == 400, bad
                assert "must be a number of seconds" in (await resp.json())["error"], bad
    async with ApiClient(daemon.api) as api:
        assert await api.jobs() == []
        assert (await api.status())["vms"] == []
    assert daemon.vm_dirs() == []
    assert "Traceback" not in daemon.log()


@pytest.mark.vm
async def test_a_job_that_cannot_start_is_failed_with_the_reason(daemon: DaemonProcess) -> None:
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "workdir": ({"command": ["true"], "workdir": "/no/such/dir"},
                    "cannot start the job: working directory /no/such/dir: No such file"),
        "binary": ({"command": ["no-such-program", "arg"]},
                   "cannot start the job: no-such-program: No such file or directory"),
        "not-runnable": ({"command": ["/etc"]}, "cannot start the job: /etc: Permission denied"),
    }
    async with ApiClient(daemon.api) as api:
        ids = {name: (await api.submit(spec))["id"] for name, (spec, _) in cases.items()}
        done = await wait_terminal(api, list(ids.values()))
        for name, (_, reason) in cases.items():
            job = done[ids[name]]
            assert job["state"] == "failed", (name, job)
            assert job["exit_code"] == (126 if name == "not-runnable" else 127), (name, job)
            log = b"".join([chunk async for chunk in api.logs(ids[name])]).decode()
            assert reason in log, (name, log)
