"""The CLI's short-lived commands import only what they use.

gitlab-runner starts `snapfleet gitlab-executor <step>` once per stage, so start-up
is most of a stage's cost (issue 13: ≤80 ms for interpreter and imports). Each
step runs here as a real process under ``python -X importtime``, against nothing
and against a local server shaped like the daemon's lease API, and must not
import what would bring the cost back. The timings themselves are benchmarks
(bench/gitlab_prepare.py), not tests.

Also: the stages' own copy of a few settings and limits agrees with the full
model they mirror.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from runner.cli import client_settings
from runner.config import load_settings
from runner.errors import ConfigError
from runner.forge.gitlab_executor import MAX_SCRIPT_FRAME, script_refusal
from runner.limits import MAX_JOB_BYTES
from runner.service.jobs import ExecRequest

HEAVY = {"asyncio", "aiohttp", "pyroute2", "structlog", "pydantic_settings", "runner.config"}
"""Never imported by a client of the daemon (`submit` validates its job with pydantic)."""
STAGE_HEAVY = HEAVY | {"pydantic", "pydantic_core", "runner.errors", "runner.agent.messages"}
"""Never imported by a GitLab executor step (`runner.errors` pulls the agent protocol)."""


def imported(argv: list[str], env: dict[str, str]
             ) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "runner.cli", *argv],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    names = {line.split("|")[-1].strip() for line in done.stderr.splitlines()
             if line.startswith("import time:") and "imported package" not in line}
    assert "runner.cli" in names, done.stderr[-2000:]
    return names, done


@pytest.fixture
def stage_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "config.toml").write_text(f'[daemon]\napi_socket = "{tmp_path}/api.sock"\n')
    (tmp_path / "script").write_text("echo hi\n")
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("snapfleet_")}
    return {**env, "CUSTOM_ENV_CI_JOB_ID": "7", "CUSTOM_ENV_CI_RUNNER_ID": "1",
            "SYSTEM_FAILURE_EXIT_CODE": "2", "BUILD_FAILURE_EXIT_CODE": "1"}


def stage(tmp_path: Path, *args: str) -> list[str]:
    return ["--config", str(tmp_path / "config.toml"), "gitlab-executor", *args]


@pytest.mark.parametrize("args", [["config"], ["prepare"], ["run", "SCRIPT", "build_script"],
                                  ["cleanup"]])
def test_stages_without_a_daemon_stay_lean(tmp_path: Path, stage_env: dict[str, str],
                                           args: list[str]) -> None:
    args = [str(tmp_path / "script") if a == "SCRIPT" else a for a in args]
    names, done = imported(stage(tmp_path, *args), stage_env)
    assert names & STAGE_HEAVY == set()
    # No daemon: each says so the way gitlab-runner needs (`config` asks it whether the
    # job's profile can serve it; `cleanup` does not fail the job).
    assert "cannot reach the daemon" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.returncode == (0 if args[0] == "cleanup" else 2)


@contextlib.asynccontextmanager
async def fake_lease_api(path: Path) -> AsyncIterator[list[str]]:
    """The daemon's lease routes, answering at once; yields the requests seen."""
    seen: list[str] = []

    async def acquire(request: web.Request) -> web.Response:
        seen.append(f"acquire {(await request.json())['key']}")
        return web.json_response({"key": "k", "profile": "default", "vm_id": "vm1",
                                  "snapshot": "abc", "restore_ms": 5.0, "warm": False},
                                 status=201)

    async def check(request: web.Request) -> web.Response:
        seen.append(f"check {request.query.get('profile')}")
        return web.json_response({"profile": "default", "image": "gitlab-runner",
                                  "problems": []})

    async def release(request: web.Request) -> web.Response:
        seen.append("release")
        return web.json_response({"released": True})

    async def execute(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        seen.append(f"exec {json.loads(await ws.receive_str())['stage']}")
        await ws.send_bytes(b"\x01hi\n")
        await ws.send_json({"state": "succeeded", "exit_code": 0, "exit": 0})
        await ws.close()
        return ws

    app = web.Application()
    app.add_routes([web.post("/v1/leases", acquire), web.get("/v1/leases/check", check),
                    web.delete("/v1/leases/{key}", release),
                    web.get("/v1/leases/{key}/exec", execute)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    try:
        yield seen
    finally:
        await runner.cleanup()


async def test_a_whole_job_through_the_stages_stays_lean(tmp_path: Path,
                                                        stage_env: dict[str, str]) -> None:
    async with fake_lease_api(tmp_path / "api.sock") as seen:
        for args in (["config"], ["prepare"],
                     ["run", str(tmp_path / "script"), "build_script"], ["cleanup"]):
            names, done = await asyncio.to_thread(imported, stage(tmp_path, *args), stage_env)
            assert done.returncode == 0, done.stderr[-2000:]
            assert names & STAGE_HEAVY == set(), args
    assert seen == ["check None", "acquire gl:gitlab:1:7", "exec build_script", "release"]


def test_submit_and_status_skip_the_daemons_imports(tmp_path: Path,
                                                    stage_env: dict[str, str]) -> None:
    (tmp_path / "job.toml").write_text('command = ["true"]\n')
    config = ["--config", str(tmp_path / "config.toml")]
    names, done = imported([*config, "submit", str(tmp_path / "job.toml")], stage_env)
    assert done.returncode == 125
    assert "cannot reach the daemon" in done.stderr
    assert names & HEAVY == set()
    names, done = imported([*config, "status"], stage_env)
    assert done.returncode == 125
    assert "cannot reach the daemon" in done.stderr
    assert names & (HEAVY | {"pydantic"}) == set()


def test_reading_the_config_does_not_import_pyroute2() -> None:
    done = subprocess.run([sys.executable, "-c", "import runner.config, sys;"
                           " print(sorted(m for m in sys.modules if m.startswith('pyroute2')))"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --- the stages' settings agree with the full configuration ---------------------------

CASES: list[tuple[str, dict[str, str]]] = [
    ("", {}),
    ('[daemon]\napi_socket = "/srv/api.sock"\n[gitlab]\nbuilds_dir = "/b"\ncache_dir = "/c"\n',
     {}),
    ('[daemon]\napi_socket = "/file.sock"\n', {"SNAPFLEET_DAEMON__API_SOCKET": "/env.sock"}),
    ('[gitlab]\nbuilds_dir = "/file"\n', {"snapfleet_gitlab__builds_dir": "/lower-case-env"}),
    ('default_profile = "big"\n[gitlab]\nallowed_profiles = ["big"]\n[profiles.big]\n', {}),
    ('[daemon]\napi_socket = ""\n', {}),
    ('[daemon]\napi_socket = 5\n', {}),
    ('[daemon]\napi_socket = []\n', {}),
    ("daemon = 5\n", {}),
    ('gitlab = "x"\n', {}),
    ("[gitlab]\nbuilds_dir = true\ncache_dir = 1979-05-27\n", {}),
    ("default_profile = 3\n", {}),
    ('default_profile = "nope"\n', {}),
    ('[daemon]\napi_socket = "/a.sock"\n', {"SNAPFLEET_DAEMON": '{"api_socket": "/json.sock"}'}),
    ("[daemon\n", {}),
]


def outcome(load: Any, path: Path) -> object:
    try:
        return load(path)
    except ConfigError as exc:
        return exc.problems


@pytest.mark.parametrize(("toml", "env"), CASES)
def test_client_settings_match_the_full_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               toml: str, env: dict[str, str]) -> None:
    for name in [k for k in os.environ if k.lower().startswith("snapfleet_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "config.toml"
    path.write_text(toml)

    def full(path: Path) -> client_settings.ClientSettings:
        s = load_settings(path)
        return client_settings.ClientSettings(s.daemon.api_socket, s.gitlab.builds_dir,
                                              s.gitlab.cache_dir, s.default_profile)

    lean, reference = outcome(client_settings.load, path), outcome(full, path)
    if isinstance(reference, list) and isinstance(lean, list):
        # The full loader also checks keys the stages never read; for theirs, the same words.
        assert lean
        assert set(lean) <= set(reference), (lean, reference)
    else:
        assert lean == reference


def test_a_missing_config_file_is_named() -> None:
    with pytest.raises(ConfigError, match=r"config file /nonexistent\.toml does not exist"):
        client_settings.load(Path("/nonexistent.toml"))


# --- the stages' copies of limits agree with the originals ------------------------------

def test_copied_constants_match_their_originals() -> None:
    from runner.cli import EXIT_SYSTEM
    from runner.execution import EXIT_SYSTEM as ORIGINAL

    assert EXIT_SYSTEM == ORIGINAL
    assert MAX_SCRIPT_FRAME == MAX_JOB_BYTES


def _size(script: str) -> int:
    return len(json.dumps({"argv": None, "script": script, "env": {}, "cwd": None},
                          separators=(",", ":")))


@pytest.mark.parametrize("script", [
    "echo hi",
    "echo nul\x00byte",
    "x" * (MAX_JOB_BYTES - _size("")),          # exactly at the limit
    "x" * (MAX_JOB_BYTES - _size("") + 1),      # one byte over
    "é" * ((MAX_JOB_BYTES - _size("")) // 6),   # escaped to \\u00e9: six bytes each
    "é" * ((MAX_JOB_BYTES - _size("")) // 6 + 1),
    '"' * ((MAX_JOB_BYTES - _size("")) // 2 + 1),
])
def test_script_refusal_agrees_with_exec_request(script: str) -> None:
    try:
        ExecRequest.parse({"script": script})
        expected = None
    except ConfigError as exc:
        expected = str(exc)
    assert script_refusal(script) == expected
