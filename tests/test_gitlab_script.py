"""The generated GitLab job script, run for real by bash in a temp dir (not in a VM).

The source comes from a real git repository served by ``git http-backend``
behind a small aiohttp CGI wrapper that demands the job token as HTTP basic
auth, as GitLab does. While a script runs, a sampler reads every process's
argv from /proc: the job token must never show there.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
import time
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runner.forge.gitlab import _collect
from runner.forge.gitlab.layout import CHUNK, GuestLayout, guest_parts
from runner.forge.gitlab.payload import JobPayload
from runner.forge.gitlab.result import ResultReader, ScriptResult, outcome
from runner.forge.gitlab.script import build_script, expand, unsupported_reason
from runner.forge.gitlab.session import JobOutcome
from runner.forge.gitlab.timeouts import (
    after_script_timeout,
    go_duration,
    host_deadline_s,
    parse_duration,
)
from tests.fake_gitlab import make_job, variable
from tests.git_http import GitServer, git, serve_repo


@pytest.fixture(scope="module")
async def git_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GitServer]:
    commits = [{"README.md": "first\n", ".gitignore": "ignored.log\n"},
               {"README.md": "second\n",
                "build.sh": "mkdir -p out/skip && echo built > out/app.txt\n"}]
    async with serve_repo(tmp_path_factory.mktemp("gitsrv"), commits) as server:
        yield server


@dataclass
class Run:
    stdout: bytes
    stderr_rest: bytes
    result: ScriptResult | None
    returncode: int
    seconds: float
    layout: GuestLayout
    argv_seen: list[str]

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


def _sample_argv(stop: list[bool], seen: list[str], needle: bytes) -> None:
    while not stop:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if needle in cmdline:
                seen.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
        time.sleep(0.002)


async def run_job(
    tmp_path: Path,
    payload: dict[str, Any],
    *,
    layout: GuestLayout | None = None,
    put: list[tuple[str, bytes]] | None = None,
    cancel_after: str | None = None,
) -> Run:
    job = JobPayload.parse(payload)
    layout = layout or GuestLayout(str(tmp_path / "builds"), str(tmp_path / "work"))
    script = tmp_path / "job.sh"
    script.write_text(build_script(job, layout))
    script.chmod(0o600)
    for path, data in put or []:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8",
           "GIT_CONFIG_NOSYSTEM": "1"}
    stop: list[bool] = []
    seen: list[str] = []
    sampler = asyncio.get_running_loop().run_in_executor(
        None, _sample_argv, stop, seen, job.token.reveal().encode())
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "bash", str(script), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        start_new_session=True, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stderr is not None
    stdout = b""
    if cancel_after is not None:
        while cancel_after.encode() not in stdout:
            stdout += await asyncio.wait_for(proc.stdout.read(4096), 20)
        os.killpg(proc.pid, signal.SIGTERM)  # what the agent's cancel does
    rest, err = await asyncio.wait_for(
        asyncio.gather(proc.stdout.read(), proc.stderr.read()), 120)
    await proc.wait()
    stop.append(True)
    await sampler
    reader = ResultReader()
    passthrough = reader.feed(err)
    return Run(stdout + rest, passthrough, reader.result, proc.returncode or 0,
               time.monotonic() - started, layout, seen)


def _another_vm(tmp_path: Path, name: str) -> tuple[Path, GuestLayout]:
    """A second job's fresh directories, as a new VM would have them."""
    root = tmp_path / name
    root.mkdir()
    return root, GuestLayout(str(root / "builds"), str(root / "work"))


def _zip_names(path: str) -> list[str]:
    with zipfile.ZipFile(path) as z:
        return sorted(z.namelist())


# -- real runs ------------------------------------------------------------------


async def test_passing_job_checks_out_runs_steps_and_zips_artifacts(
    git_server: GitServer, tmp_path: Path
) -> None:
    payload = git_server.job(
        101, variables=[variable("DEPLOY_KEY", "k3y-v4lue-secret", masked=True),
                   variable("CONF", "line1\nline2 $HOME\n", file=True, raw=True),
                   variable("GREETING", "hello $CI_PROJECT_NAME", raw=False),
                   variable("RAW", "keep $CI_PROJECT_NAME", raw=True)],
        script=["sh build.sh", "echo to-stderr >&2; echo to-stdout",
                'echo "greeting=$GREETING raw=$RAW"', 'cat "$CONF"',
                'test "$(stat -c %a "$CONF")" = 600', "echo junk > untracked.bin",
                "echo x > ignored.log; mkdir -p out/skip; echo no > out/skip/tmp.txt",
                "cat README.md"],
        after_script=['echo "after: status=$CI_JOB_STATUS"'],
        artifacts=[{"name": "build", "untracked": True, "paths": ["out/", "README.md"],
                    "exclude": ["out/skip/**"], "when": "on_success",
                    "artifact_type": "archive", "artifact_format": "zip", "expire_in": ""},
                   {"name": "logs", "untracked": False, "paths": ["*.log"], "exclude": [],
                    "when": "on_failure", "artifact_type": "archive",
                    "artifact_format": "zip", "expire_in": ""}],
    )
    run = await run_job(tmp_path, payload)
    assert run.result == ScriptResult("success", 0, None, False, (0,)), run.text
    assert run.returncode == 0
    assert run.stderr_rest == b""
    text = run.text
    assert "Checking out " + git_server.shas[1][:8] in text
    assert "second\n" in text  # README at the job's sha
    assert "to-stderr\nto-stdout\n" in text  # one stream, in order
    assert "greeting=hello project raw=keep $CI_PROJECT_NAME" in text
    assert "line1\nline2 $HOME\n" in text
    assert "after: status=success" in text
    for section in ("prepare_script", "get_sources", "step_script", "step_after_script",
                    "upload_artifacts_on_success"):
        assert re.search(rf"section_start:\d+:{section}\r\x1b\[0K", text), section
        assert re.search(rf"section_end:\d+:{section}\r\x1b\[0K", text), section
    assert "\x1b[32;1m$ sh build.sh\x1b[0;m" in text
    assert _zip_names(run.layout.artifact_path(0)) == [
        "README.md", "ignored.log", "out/app.txt", "untracked.bin"]
    assert not os.path.exists(run.layout.artifact_path(1))
    project = Path(run.layout.project_dir(JobPayload.parse(payload)))
    assert project == tmp_path / "builds" / "group" / "project"
    config = (project / ".git" / "config").read_text()
    assert payload["token"] not in config  # the remote URL carries no credentials
    assert run.argv_seen == []  # the token was never in any process's argv
    assert git_server.auth_failures >= 1  # git had to authenticate, and did


async def test_failing_step_stops_the_script_and_after_script_sees_failed(
    git_server: GitServer, tmp_path: Path
) -> None:
    payload = git_server.job(
        102, script=["echo one", "echo oops > failure.log; exit 3", "echo never"],
        after_script=['echo "after: status=$CI_JOB_STATUS"', "exit 9"],
        artifacts=[{"name": "a", "untracked": False, "paths": ["README.md"], "exclude": [],
                    "when": "on_success", "artifact_type": "archive",
                    "artifact_format": "zip", "expire_in": ""},
                   {"name": "logs", "untracked": False, "paths": ["*.log"], "exclude": [],
                    "when": "on_failure", "artifact_type": "archive",
                    "artifact_format": "zip", "expire_in": ""}],
    )
    run = await run_job(tmp_path, payload)
    assert run.result == ScriptResult("failed", 3, "script", False, (1,))
    assert run.returncode == 3
    assert "one\n" in run.text
    assert "never" not in run.text.replace("$ echo never", "")
    assert "after: status=failed" in run.text
    assert "after_script failed, but the job continues" in run.text
    assert "ERROR: Job failed: exit code 3" in run.text
    assert _zip_names(run.layout.artifact_path(1)) == ["failure.log"]
    assert outcome(run.result, timed_out=False, cancelled=False) == JobOutcome.failed(
        "script_failure", 3)


async def test_script_timeout_kills_the_step_group_and_after_script_still_runs(
    git_server: GitServer, tmp_path: Path
) -> None:
    # As GitLab sends it: the step's timeout is the job's; RUNNER_SCRIPT_TIMEOUT is shorter.
    payload = git_server.job(
        103, variables=[variable("RUNNER_SCRIPT_TIMEOUT", "1s")],
        script=["echo start", "(sleep 60; echo orphan) & sleep 60"],
        after_script=['echo "after: $CI_JOB_STATUS"'])
    run = await run_job(tmp_path, payload)
    assert run.result is not None
    assert run.result.timed_out
    assert run.result.step == "script"
    assert run.seconds < 15
    assert "exceeded its timeout of 1 s" in run.text
    assert "after: failed" in run.text
    assert outcome(run.result, timed_out=False, cancelled=False).failure_reason == (
        "job_execution_timeout")


async def test_job_timeout_ends_the_script_then_after_script_and_archives_still_run(
    git_server: GitServer, tmp_path: Path
) -> None:
    # GitLab's shape: every step's timeout, after_script's too, is the job's own (3 s).
    payload = git_server.job(
        112, timeout=3,
        script=["echo evidence > evidence.log; mkdir -p vendor; echo v > vendor/a.txt",
                "echo sleeping; sleep 60; echo woke"],
        after_script=['echo "after: status=$CI_JOB_STATUS"'],
        artifacts=[{"name": "logs", "untracked": False, "paths": ["*.log"], "exclude": [],
                    "when": "always", "artifact_type": "archive",
                    "artifact_format": "zip", "expire_in": ""}],
        cache=[_cache("deps", "pull-push", ["vendor/"], when="always")])
    assert {s["timeout"] for s in payload["steps"]} == {3}
    run = await run_job(tmp_path, payload)
    text = run.text
    assert run.result is not None, text
    assert run.result.status == "failed"
    assert run.result.timed_out
    assert run.seconds < 20
    assert "ERROR: Job failed: execution took longer than 3s seconds" in text
    assert "Job was canceled" not in text
    assert "woke" not in text.replace("echo woke", "")
    assert "after: status=failed" in text  # after_script ran, past the job's deadline
    assert run.result.artifacts == (0,)
    assert _zip_names(run.layout.artifact_path(0)) == ["evidence.log"]
    assert run.result.caches == (0,)
    assert _zip_names(run.layout.cache_path(0)) == ["vendor/a.txt"]
    assert outcome(run.result, timed_out=False, cancelled=False).failure_reason == (
        "job_execution_timeout")


async def test_after_script_has_its_own_time_limit(
    git_server: GitServer, tmp_path: Path
) -> None:
    payload = git_server.job(
        113, timeout=600, variables=[variable("RUNNER_AFTER_SCRIPT_TIMEOUT", "1s")],
        script=["echo done"], after_script=["echo after-start; sleep 60; echo after-end"])
    run = await run_job(tmp_path, payload)
    assert run.result is not None
    assert run.result.status == "success", run.text  # after_script never fails the job
    assert run.seconds < 15
    assert "after-start" in run.text
    assert "after-end" not in run.text.replace("echo after-end", "")
    assert "after_script exceeded its timeout of 1 s" in run.text


def test_timeouts_follow_gitlab_runner() -> None:
    assert [parse_duration(t) for t in ("5m", "1h30m", "90", "1.5s", "250ms", "2h0m0s",
                                        "", "soon", "5 m", "-1s")] == [
        300, 5400, 90, 2, 1, 7200, None, None, None, None]
    assert [go_duration(s) for s in (3, 60, 300, 3600, 5430)] == [
        "3s", "1m0s", "5m0s", "1h0m0s", "1h30m30s"]
    job = JobPayload.parse(make_job(1, timeout=900))
    assert after_script_timeout(job) == 300
    assert host_deadline_s(job) == 900 + 300 + 120
    job = JobPayload.parse(make_job(1, timeout=900, variables=[
        variable("RUNNER_AFTER_SCRIPT_TIMEOUT", "10m")]))
    assert host_deadline_s(job) == 900 + 600 + 120
    bad = JobPayload.parse(make_job(1, variables=[variable("RUNNER_AFTER_SCRIPT_TIMEOUT", "x")]))
    assert after_script_timeout(bad) == 300
    assert 'RUNNER_AFTER_SCRIPT_TIMEOUT="x" is not a duration' in build_script(bad)
    unset = JobPayload.parse({**make_job(1), "runner_info": None})
    assert unset.timeout_s == 7200  # gitlab-runner's default when GitLab sends none


async def test_sigterm_cancels_the_running_step_promptly(
    git_server: GitServer, tmp_path: Path
) -> None:
    marker = tmp_path / "survived"
    payload = git_server.job(104, script=[f"echo started; sleep 30; touch {marker}"],
                   after_script=["echo after-ran"])
    started = time.monotonic()
    run = await run_job(tmp_path, payload, cancel_after="started")
    assert time.monotonic() - started < 15, run.text
    assert run.result is not None
    assert run.result.status == "canceled"
    assert "ERROR: Job was canceled" in run.text
    assert "after-ran" not in run.text
    await asyncio.sleep(0.5)
    assert not marker.exists()
    assert outcome(run.result, timed_out=False, cancelled=True).failure_reason == "job_canceled"


async def test_wrong_token_fails_get_sources_and_runs_no_step(
    git_server: GitServer, tmp_path: Path
) -> None:
    payload = git_server.job(105, script=["echo should-not-run"],
                   after_script=["echo after-ran"])
    git_server.tokens.discard(payload["token"])
    run = await run_job(tmp_path, payload)  # token not known to the git server
    assert run.result is not None
    assert run.result.status == "failed"
    assert run.result.step == "get_sources"
    assert "should-not-run\n" not in run.text
    assert "after-ran" in run.text  # after_script is "always"
    assert payload["token"] not in run.text


async def test_fetch_strategy_reuses_the_checkout_and_moves_to_the_new_sha(
    git_server: GitServer, tmp_path: Path
) -> None:
    first = git_server.job(106, sha=git_server.shas[0], depth=0,
                 script=["cat README.md", "echo scratch > scratch.txt"])
    run1 = await run_job(tmp_path, first)
    assert "first\n" in run1.text
    assert "Created fresh repository." in run1.text
    second = git_server.job(107, script=["cat README.md", "test ! -e scratch.txt"])
    run2 = await run_job(tmp_path, second)
    assert run2.result is not None
    assert run2.result.status == "success", run2.text
    assert "Reinitialized existing Git repository" in run2.text
    assert "second\n" in run2.text


async def test_dependencies_arrive_in_parts_and_are_extracted(
    git_server: GitServer, tmp_path: Path
) -> None:
    big = os.urandom(CHUNK + 1000)  # incompressible: the zip spans two parts
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("dist/blob.bin", big)
        z.writestr("dist/version.txt", "1.2.3\n")
    (tmp_path / "blob").write_bytes(big)
    payload = git_server.job(
                   108, script=["cat dist/version.txt", f"cmp dist/blob.bin {tmp_path / 'blob'}"],
                   dependencies=[{"id": 90, "name": "compile", "token": "dep-token",
                                  "artifacts_file": {"filename": "artifacts.zip", "size": 1}}])
    layout = GuestLayout(str(tmp_path / "builds"), str(tmp_path / "work"))
    parts = guest_parts(layout.dependency_dir(), [(90, archive.getvalue())])
    assert len(parts) == 2
    run = await run_job(tmp_path, payload, layout=layout, put=parts)
    assert run.result is not None
    assert run.result.status == "success", run.text
    assert "1.2.3" in run.text
    assert "Extracted artifacts of compile (90)" in run.text

    missing = tmp_path / "missing"
    missing.mkdir()
    run = await run_job(missing, payload)
    assert "no artifacts of compile (90) arrived" in run.text


def _cache(key: str, policy: str, paths: list[str], when: str = "on_success") -> dict[str, Any]:
    return {"key": key, "untracked": False, "policy": policy, "paths": paths, "when": when,
            "fallback_keys": []}


async def test_caches_are_restored_before_the_steps_and_saved_after(
    git_server: GitServer, tmp_path: Path
) -> None:
    layout = GuestLayout(str(tmp_path / "builds"), str(tmp_path / "work"))
    writes = git_server.job(109, script=["mkdir -p vendor && echo v1 > vendor/lib.txt"],
                  cache=[_cache("deps-main", "pull-push", ["vendor/"]),
                         _cache("read-only", "pull", ["vendor/"])])
    first = await run_job(tmp_path, writes, layout=layout)
    assert first.result is not None
    assert first.result.status == "success", first.text
    assert first.result.caches == (0,)  # a "pull" cache is never saved
    assert "no cache for deps-main yet" in first.text
    assert _zip_names(layout.cache_path(0)) == ["vendor/lib.txt"]
    assert "1 files found to cache" in first.text

    kept = Path(layout.cache_path(0)).read_bytes()
    reads = git_server.job(110, script=["cat vendor/lib.txt"],
                 cache=[_cache("deps-main", "pull", ["vendor/"])])
    again, layout2 = _another_vm(tmp_path, "again")
    second = await run_job(again, reads, layout=layout2,
                           put=guest_parts(layout2.cache_in_dir(), [(0, kept)]))
    assert second.result is not None
    assert second.result.status == "success", second.text
    assert "Successfully extracted cache deps-main" in second.text
    assert "\nv1\n" in second.text
    assert second.result.caches == ()

    pushes_only = git_server.job(111, script=["test ! -e vendor/lib.txt"],
                       cache=[_cache("deps-main", "push", ["vendor/"])])
    third_dir, layout3 = _another_vm(tmp_path, "third")
    third = await run_job(third_dir, pushes_only, layout=layout3,
                          put=guest_parts(layout3.cache_in_dir(), [(0, kept)]))
    assert third.result is not None
    assert third.result.status == "success", third.text  # a "push" cache is not restored
    assert "WARNING: No files to cache" in third.text
    assert third.result.caches == ()


async def test_job_variables_expand_the_runner_defined_directories(
    git_server: GitServer, tmp_path: Path
) -> None:
    payload = git_server.job(114, variables=[
        variable("OUT", "$CI_PROJECT_DIR/out", raw=False),
        variable("CACHE_AT", "${CI_BUILDS_DIR}/.cache", raw=False),
        variable("CI_PROJECT_DIR", "/elsewhere")],  # the runner's own wins
        script=['echo "out=$OUT cache=$CACHE_AT dir=$CI_PROJECT_DIR"'])
    run = await run_job(tmp_path, payload)
    assert run.result is not None
    assert run.result.status == "success", run.text
    project = run.layout.project_dir(JobPayload.parse(payload))
    builds = run.layout.builds_dir
    assert f"out={project}/out cache={builds}/.cache dir={project}\n" in run.text


async def test_git_flags_none_skip_clean_and_extra_fetch_flags(
    git_server: GitServer, tmp_path: Path
) -> None:
    first = git_server.job(115, script=["echo keep > untracked.txt"])
    assert (await run_job(tmp_path, first)).result is not None
    payload = git_server.job(116, variables=[variable("GIT_CLEAN_FLAGS", "none"),
                                             variable("GIT_FETCH_EXTRA_FLAGS", "none")],
                             script=["cat untracked.txt"])
    job = JobPayload.parse(payload)
    script = build_script(job)
    assert "git clean" not in script
    assert "--prune" not in script
    run = await run_job(tmp_path, payload)  # the same checkout, fetched again
    assert run.result is not None
    assert run.result.status == "success", run.text
    assert "\nkeep\n" in run.text  # not cleaned away

    flags = JobPayload.parse(git_server.job(117, variables=[
        variable("GIT_CLEAN_FLAGS", "-ffdx -e keep.txt"),
        variable("GIT_FETCH_EXTRA_FLAGS", "--prune --quiet")]))
    assert "git clean -ffdx -e keep.txt -q" in build_script(flags)
    assert "git fetch origin --prune --quiet --no-recurse-submodules" in build_script(flags)


async def test_get_sources_hooks_run_around_the_fetch(
    git_server: GitServer, tmp_path: Path
) -> None:
    hooks = [{"name": "pre_get_sources_script", "script": ["echo pre-hook", "pwd"]},
             {"name": "post_get_sources_script",
              "script": ["echo post-hook", "test -f build.sh && echo post-sees-checkout"]}]
    run = await run_job(tmp_path, git_server.job(118, hooks=hooks, script=["echo step"]))
    assert run.result is not None
    assert run.result.status == "success", run.text
    text = run.text
    order = [text.index(s) for s in ("pre-hook", "Fetching changes", "Checking out",
                                     "post-hook", "post-sees-checkout", "\nstep\n")]
    assert order == sorted(order), text

    failing = [{"name": "pre_get_sources_script", "script": ["false", "echo not-reached"]}]
    run = await run_job(tmp_path, git_server.job(119, hooks=failing, script=["echo step"]))
    assert run.result is not None
    assert (run.result.status, run.result.step) == ("failed", "get_sources"), run.text
    assert "not-reached" not in run.text
    assert "\nstep\n" not in run.text

    skipped = git_server.job(120, hooks=hooks, script=["echo step"],
                             variables=[variable("GIT_STRATEGY", "none")])
    assert "pre-hook" not in build_script(JobPayload.parse(skipped))  # no fetch, no hooks


async def test_submodules_are_fetched_with_the_job_token(
    git_server: GitServer, tmp_path: Path
) -> None:
    # group/lib.git, and a commit of group/project that has it as a submodule at lib/.
    work = tmp_path / "authoring"
    work.mkdir()
    lib_src = work / "lib"
    lib_src.mkdir()
    git(lib_src, "init", "-q", "-b", "main")
    (lib_src / "lib.txt").write_text("from the submodule\n")
    git(lib_src, "add", "-A")
    git(lib_src, "commit", "-q", "-m", "lib")
    lib_sha = git(lib_src, "rev-parse", "HEAD")
    git(work, "clone", "-q", "--bare", str(lib_src), str(git_server.root / "group/lib.git"))
    sup = work / "project"
    git(work, "clone", "-q", str(git_server.root / "group/project.git"), str(sup))
    (sup / ".gitmodules").write_text('[submodule "lib"]\n\tpath = lib\n\turl = ../lib.git\n')
    git(sup, "update-index", "--add", "--cacheinfo", f"160000,{lib_sha},lib")
    git(sup, "add", ".gitmodules")
    git(sup, "commit", "-q", "-m", "add lib")
    sha = git(sup, "rev-parse", "HEAD")
    git(sup, "push", "-q", "origin", "HEAD:refs/heads/with-lib")

    payload = git_server.job(118, sha=sha, variables=[
        variable("GIT_SUBMODULE_STRATEGY", "recursive")],
        script=["cat lib/lib.txt", 'test -z "${__SF_GIT_PASSWORD:-}"'])  # fetch's only
    before = git_server.auth_failures
    run = await run_job(tmp_path, payload)
    assert run.result is not None
    assert run.result.status == "success", run.text
    assert "Updating/initializing submodules recursively..." in run.text
    assert "from the submodule" in run.text
    assert git_server.auth_failures > before  # the submodule's fetch authenticated too
    assert run.argv_seen == []
    assert payload["token"] not in run.text

    plain = git_server.job(119, sha=sha, script=["test ! -e lib/lib.txt"])
    again, layout = _another_vm(tmp_path, "plain")
    run = await run_job(again, plain, layout=layout)
    assert run.result is not None
    assert run.result.status == "success", run.text  # no strategy: no submodules


# -- pure pieces ------------------------------------------------------------------


def test_image_and_services_are_refused_with_a_reason() -> None:
    plain = JobPayload.parse(make_job(1))
    assert unsupported_reason(plain) is None
    boxed = JobPayload.parse(make_job(2, image={"name": "ruby:3.3"},
                                      services=[{"name": "postgres:16"}]))
    reason = unsupported_reason(boxed)
    assert reason is not None
    assert "'ruby:3.3'" in reason
    assert "'postgres:16'" in reason
    assert JobPayload.parse(make_job(3, image={"name": ""})).image is None
    steps = JobPayload.parse({**make_job(4, steps=[]), "run": '[{"name":"hi","script":"echo"}]'})
    reason = unsupported_reason(steps)
    assert reason is not None
    assert "`run` keyword" in reason


def test_null_reads_as_the_zero_value_as_go_does() -> None:
    raw = make_job(5, cache=[{"key": "k", "untracked": None, "policy": None, "paths": None,
                              "when": None, "fallback_keys": None}],
                   artifacts=[{"name": None, "untracked": None, "paths": ["a"],
                               "exclude": None, "when": None, "artifact_type": None,
                               "artifact_format": None, "expire_in": None}])
    raw["allow_git_fetch"] = None
    raw["git_info"]["depth"] = None
    raw["steps"][0]["timeout"] = None
    raw["steps"][0]["allow_failure"] = None
    raw["variables"].append({"key": "V", "value": None, "public": None, "masked": None,
                             "file": None, "raw": None})
    raw["dependencies"] = [{"id": 3, "name": "d", "token": None,
                            "artifacts_file": {"filename": None, "size": None}}]
    raw["features"]["trace_sections"] = None
    job = JobPayload.parse(raw)
    assert job.cache[0].untracked is False
    assert job.allow_git_fetch is False
    assert job.git_info.depth == 0
    assert job.steps[0].timeout == 0
    assert job.steps[0].allow_failure is False
    assert job.variable("V") == ""
    assert job.dependencies[0].artifacts_file is not None
    assert job.dependencies[0].artifacts_file.size == 0
    assert job.artifacts[0].untracked is False
    assert "__sf_main script 0 " in build_script(job)  # no step limit: the job's applies


def test_variable_expansion_follows_gitlab_runner() -> None:
    variables = [("A", "x", False), ("B", "$A-${A}-$MISSING-$$", False),
                 ("C", "$A", True), ("F", "content", False)]
    assert expand(variables, {"F": "/w/vars/F"}) == ["x", "x-x--$", "$A", "content"]
    assert expand([("G", "$F", False), ("F", "c", False)], {"F": "/p"}) == ["/p", "c"]


@pytest.mark.parametrize(
    ("result", "timed_out", "cancelled", "expected"),
    [
        (ScriptResult("success", 0, None, False, ()), False, False, JobOutcome.success()),
        (ScriptResult("failed", 2, "script", False, ()), False, False,
         JobOutcome.failed("script_failure", 2)),
        (ScriptResult("failed", 124, "script", True, ()), False, False,
         JobOutcome.failed("job_execution_timeout", 124)),
        (ScriptResult("canceled", 143, None, False, ()), False, False,
         JobOutcome.failed("job_canceled")),
        (None, True, False, JobOutcome.failed("job_execution_timeout")),
        (None, False, True, JobOutcome.failed("job_canceled")),
        (None, False, False, JobOutcome.failed("runner_system_failure")),
    ],
)
def test_outcome_table(
    result: ScriptResult | None, timed_out: bool, cancelled: bool, expected: JobOutcome
) -> None:
    assert outcome(result, timed_out=timed_out, cancelled=cancelled) == expected


def test_result_reader_splits_the_result_from_stray_stderr() -> None:
    reader = ResultReader()
    got = reader.feed(b"bash: oops\nsnapfleet-gitlab-res")
    got += reader.feed(b"ult status=failed exit_code=4 step=script timed_out=0 artifacts=0,2\n")
    assert got == b"bash: oops\n"
    assert reader.result == ScriptResult("failed", 4, "script", False, (0, 2))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel in ("a.txt", "b.log", "dir/c.txt", "dir/sub/d.txt", "dir/sub/e.bin",
                "other/f.txt", ".git/config"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    return tmp_path


@pytest.mark.parametrize(
    ("paths", "exclude", "expected"),
    [
        (["*.txt"], [], ["a.txt"]),
        (["**/*.txt"], [], ["a.txt", "dir/c.txt", "dir/sub/d.txt", "other/f.txt"]),
        (["dir/"], ["dir/sub/*.bin"], ["dir/c.txt", "dir/sub/d.txt"]),
        (["dir"], ["dir/sub"], ["dir/c.txt"]),
        (["./a.txt", "../outside", "/etc/passwd"], [], ["a.txt"]),
        (["."], ["**/*.txt"], ["b.log", "dir/sub/e.bin"]),
        (["d?r/s[u]b/*"], [], ["dir/sub/d.txt", "dir/sub/e.bin"]),
    ],
)
def test_artifact_selection(
    tree: Path, paths: list[str], exclude: list[str], expected: list[str]
) -> None:
    assert _collect.select(str(tree), paths, exclude, untracked=False) == expected


def test_collector_exits_3_when_nothing_matches(tree: Path, capsys: Any) -> None:
    out = tree / "x.zip"
    assert _collect.main([str(tree), str(out), json.dumps({"paths": ["nope/"]})]) == 3
    assert "No files to upload" in capsys.readouterr().out
    assert not out.exists()
