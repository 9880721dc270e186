"""``snapfleet gitlab register|check|unregister`` as a user runs them, against a fake GitLab."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner.forge.gitlab.config import GitLabRunnerConfig
from tests.fake_gitlab import FakeGitLab, running_fake

ACCESS = "glpat-access-token-1234"


@dataclass
class Done:
    code: int
    out: str
    err: str


@pytest.fixture
async def gitlab() -> AsyncIterator[FakeGitLab]:
    async with running_fake(access_token=ACCESS, runner_tokens=set()) as fake:
        yield fake


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "snapfleet.toml"
    path.write_text(f'[paths]\nstate_dir = "{tmp_path / "state"}"\n')
    return path


async def snapfleet(config: Path, *args: str, stdin: str = "") -> Done:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runner.cli", "--config", str(config), *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
    return Done(proc.returncode or 0, out.decode(), err.decode())


async def test_register_check_unregister(
    gitlab: FakeGitLab, config: Path, tmp_path: Path
) -> None:
    token_file = tmp_path / "access"
    token_file.write_text(ACCESS + "\n")
    done = await snapfleet(config, "gitlab", "register", "--url", gitlab.url,
                           "--group", "acme/platform", "--tag", "snapfleet", "--tag", "gpu",
                           "--token-file", str(token_file))
    assert done.code == 0, done.err
    (runner_id, reg), = gitlab.registered.items()
    assert reg["runner_type"] == "group_type"
    assert reg["group_id"] == 12
    assert reg["tag_list"] in (["snapfleet", "gpu"], "snapfleet,gpu")
    # The printed section is valid TOML pointing at the stored token, which is 0600.
    section = done.out[done.out.index("[[gitlab.runners]]"):]
    runner = tomllib.loads(section)["gitlab"]["runners"][0]
    assert runner["runner_id"] == runner_id
    assert GitLabRunnerConfig.model_validate(runner).tags == ["snapfleet", "gpu"]
    assert runner["tags"] == ["snapfleet", "gpu"]
    stored = Path(runner["token_file"])
    assert stored.parent == tmp_path / "state" / "credentials"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stat.S_IMODE(stored.parent.stat().st_mode) == 0o700
    assert stored.read_text().strip() == reg["token"]
    assert stored.read_text().startswith("glrt-")
    # Neither token is shown; the access token is stored nowhere.
    for text in (done.out, done.err):
        assert reg["token"] not in text
        assert ACCESS not in text
    for path in (tmp_path / "state").rglob("*"):
        if path.is_file():
            assert ACCESS not in path.read_text()

    done = await snapfleet(config, "gitlab", "check", "--url", gitlab.url)
    assert done.code == 0, done.out + done.err
    assert "OK" in done.out
    assert reg["token"] not in done.out

    done = await snapfleet(config, "gitlab", "unregister", "--url", gitlab.url)
    assert done.code == 0, done.err
    assert gitlab.registered == {}
    assert not stored.exists()
    deletes = [r for r in gitlab.requests if r.method == "DELETE"]
    assert len(deletes) == 1
    assert reg["token"] not in deletes[0].path  # in the body, not the URL


async def test_register_reads_the_access_token_from_stdin_for_a_project(
    gitlab: FakeGitLab, config: Path
) -> None:
    done = await snapfleet(config, "gitlab", "register", "--url", gitlab.url, "--project",
                           "34", "--tag", "a", stdin=ACCESS + "\n")
    assert done.code == 0, done.err
    (reg,) = gitlab.registered.values()
    assert reg["runner_type"] == "project_type"
    assert reg["project_id"] == 34


async def test_check_reports_a_revoked_token(
    gitlab: FakeGitLab, config: Path, tmp_path: Path
) -> None:
    done = await snapfleet(config, "gitlab", "register", "--url", gitlab.url, "--instance",
                           "--run-untagged", stdin=ACCESS)
    assert done.code == 0, done.err
    gitlab.runner_tokens.clear()  # an admin deleted the runner in GitLab's UI
    done = await snapfleet(config, "gitlab", "check", "--url", gitlab.url)
    assert done.code == 1
    assert "rejected the runner token" in done.out
    assert "register" in done.out


@pytest.mark.parametrize(
    ("args", "stdin", "needle"),
    [
        (["--group", "acme/platform", "--tag", "x"], "glpat-wrong", "401"),
        (["--group", "acme/platform", "--tag", "x"], "", "access token is empty"),
        (["--group", "acme/platform"], ACCESS, "at least one --tag"),
        (["--group", "no/such", "--tag", "x"], ACCESS, "404"),
    ],
)
async def test_register_failures_are_one_clear_line_and_store_nothing(
    gitlab: FakeGitLab, config: Path, tmp_path: Path, args: list[str], stdin: str,
    needle: str,
) -> None:
    done = await snapfleet(config, "gitlab", "register", "--url", gitlab.url, *args,
                           stdin=stdin)
    assert done.code != 0
    lines = [line for line in done.err.splitlines() if line.strip()]
    assert len(lines) == 1, done.err
    assert needle in lines[0]
    assert stdin.strip() == "" or stdin.strip() not in done.err
    assert not (tmp_path / "state" / "credentials").exists() or not any(
        (tmp_path / "state" / "credentials").iterdir())
    assert gitlab.registered == {}


async def test_check_refuses_a_world_readable_token(
    gitlab: FakeGitLab, config: Path, tmp_path: Path
) -> None:
    loose = tmp_path / "loose.token"
    loose.write_text("glrt-fake-runner\n")
    loose.chmod(0o644)
    done = await snapfleet(config, "gitlab", "check", "--url", gitlab.url,
                           "--runner-token-file", str(loose))
    assert done.code != 0
    assert "readable by others" in done.err


async def test_check_says_when_gitlab_is_unreachable(config: Path, tmp_path: Path) -> None:
    token = tmp_path / "r.token"
    token.write_text("glrt-fake-runner\n")
    token.chmod(0o600)
    done = await snapfleet(config, "gitlab", "check", "--url", "http://127.0.0.1:9",
                           "--runner-token-file", str(token))
    assert done.code == 1
    assert "cannot reach GitLab" in done.out
    assert "glrt-fake-runner" not in done.out + done.err


async def test_register_into_an_unwritable_place_creates_no_runner(
    gitlab: FakeGitLab, config: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the token's directory should be\n")
    done = await snapfleet(config, "gitlab", "register", "--url", gitlab.url, "--group",
                           "acme/platform", "--tag", "x", "--output",
                           str(blocker / "runner.token"), stdin=ACCESS)
    assert done.code != 0
    lines = [line for line in done.err.splitlines() if line.strip()]
    assert len(lines) == 1, done.err
    assert "cannot write the runner token" in lines[0]
    assert "nothing was registered" in lines[0]
    assert gitlab.registered == {}  # no orphan runner in GitLab
