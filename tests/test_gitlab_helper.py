"""Which profiles' images can serve gitlab-runner's custom executor (its stage scripts
call the `gitlab-runner` binary in the VM for artifacts and caches)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.api.local import DaemonClient
from runner.config import Profile, Settings
from runner.forge.gitlab_helper import ImageCheck, check_image
from tests.backends.toy import toy_settings
from tests.test_daemon_lifecycle import serving


def settings(tmp_path: Path, *, require: bool = True, **images: str) -> Settings:
    profiles: dict[str, dict[str, str]] = {"default": {}}
    profiles |= {name: {"image": image} for name, image in images.items()}
    return Settings.model_validate({
        "gitlab": {"require_helper": require},
        "paths": {"state_dir": str(tmp_path / "state"), "cache_dir": str(tmp_path / "cache")},
        "profiles": profiles,
    })


def built_image_dir(tmp_path: Path, recipe: dict[str, object] | None) -> Path:
    """An image directory as `snapfleet image build` leaves it (only its manifest matters)."""
    path = tmp_path / "built"
    path.mkdir(parents=True)
    manifest = {"name": "x"} | ({} if recipe is None else {"recipe": recipe})
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


HELPER: dict[str, object] = {
    "mirror": "http://deb.example/debian",
    "kernel_package": "linux-image-cloud-amd64",
    "archives": [{"source": "env:X", "dest": "/usr/bin/gitlab-runner", "format": "file"}],
}


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        ("gitlab-runner", None),
        ("default", "profile 'p' runs image 'default', which has no gitlab-runner helper"),
        ("github-runner", "profile 'p' runs image 'github-runner', which has no gitlab-runner"),
        ("nope", "profile 'p': image 'nope': image: no recipe 'nope'"),
    ],
)
def test_recipe_images(tmp_path: Path, image: str, problem: str | None) -> None:
    found = check_image(settings(tmp_path, p=image), "p")
    assert found.image == image
    if problem is None:
        assert found.problem is None
    else:
        assert found.problem is not None
        assert found.problem.startswith(problem), found.problem


def test_the_missing_helper_says_both_ways_out(tmp_path: Path) -> None:
    problem = check_image(settings(tmp_path), "default").problem
    assert problem is not None
    assert "\n" not in problem
    assert ("SNAPFLEET_GITLAB_RUNNER_BINARY=/path/to/gitlab-runner-linux-amd64 snapfleet image"
            " build gitlab-runner) and set image = \"gitlab-runner\" in [profiles.default]"
            ) in problem
    assert problem.endswith("or, if no job uses artifacts or caches,"
                            " set [gitlab] require_helper = false")


def test_not_required_is_never_a_problem(tmp_path: Path) -> None:
    s = settings(tmp_path, require=False, p="nope")
    assert check_image(s, "default") == ImageCheck("default")
    assert check_image(s, "p") == ImageCheck("nope")


def test_built_image_directories_are_judged_by_their_recorded_recipe(tmp_path: Path) -> None:
    with_helper = built_image_dir(tmp_path / "a", HELPER)
    assert check_image(settings(tmp_path, p=str(with_helper)), "p").problem is None
    without = built_image_dir(tmp_path / "b", {**HELPER, "archives": []})
    problem = check_image(settings(tmp_path, p=str(without)), "p").problem
    assert problem is not None
    assert "no gitlab-runner helper" in problem
    # Hand-made images record no recipe: nothing to go by, so no refusal.
    unknown = built_image_dir(tmp_path / "c", None)
    assert check_image(settings(tmp_path, p=str(unknown)), "p").problem is None


def test_unknown_profiles_are_left_to_the_allowed_check(tmp_path: Path) -> None:
    assert check_image(settings(tmp_path), "ghost") == ImageCheck(None)


# --- through a running daemon (toy VMs): the check route and the `config` stage ------

def with_gitlab_profiles(tmp_path: Path, *, require: bool) -> Settings:
    base = toy_settings(tmp_path)
    return base.model_copy(update={
        "profiles": {**base.profiles, "gl": Profile(image="gitlab-runner"),
                     "plain": Profile(), "other": Profile()},
        "gitlab": base.gitlab.model_copy(update={
            "allowed_profiles": ["default", "gl", "plain"], "require_helper": require}),
    })


def config_stage(tmp_path: Path, settings: Settings, profile: str | None
                 ) -> subprocess.CompletedProcess[str]:
    """`snapfleet gitlab-executor config` as gitlab-runner runs it."""
    config = tmp_path / "client.toml"
    config.write_text(f'[daemon]\napi_socket = "{settings.daemon.api_socket}"\n')
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("snapfleet_")}
    env |= {"SYSTEM_FAILURE_EXIT_CODE": "42", "CUSTOM_ENV_CI_JOB_ID": "1"}
    if profile is not None:
        env["CUSTOM_ENV_SNAPFLEET_PROFILE"] = profile
    return subprocess.run(
        [sys.executable, "-m", "runner.cli", "--config", str(config), "gitlab-executor", "config"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )


async def test_the_daemon_answers_what_stops_a_profile(tmp_path: Path) -> None:
    settings = with_gitlab_profiles(tmp_path, require=True)
    async with serving(settings) as running:
        client = DaemonClient(settings.daemon.api_socket)
        answers = {p: await asyncio.to_thread(client.check_lease, p)
                   for p in (None, "gl", "plain", "other")}
        plain = await asyncio.to_thread(config_stage, tmp_path, settings, "plain")
        gl = await asyncio.to_thread(config_stage, tmp_path, settings, "gl")
        assert await running.daemon.recent_jobs(10) == []  # checking takes no VM
    rootfs = str(settings.profiles["default"].rootfs)
    assert answers[None] == {"profile": "default", "image": rootfs, "problems": []}
    assert answers["gl"] == {"profile": "gl", "image": "gitlab-runner", "problems": []}
    assert answers["plain"]["image"] == "default"
    [problem] = answers["plain"]["problems"]
    assert problem.startswith("profile 'plain' runs image 'default', which has no gitlab-runner")
    assert answers["other"]["problems"][0] == (
        "profile 'other' is not allowed for GitLab jobs (allowed: ['default', 'gl', 'plain'])")

    assert (plain.returncode, plain.stdout) == (42, "")
    assert plain.stderr == f"Snapfleet: system failure: {problem}\n"
    assert gl.returncode == 0, gl.stderr
    assert json.loads(gl.stdout)["builds_dir"] == "/builds"


async def test_require_helper_false_lets_any_allowed_image_through(tmp_path: Path) -> None:
    settings = with_gitlab_profiles(tmp_path, require=False)
    async with serving(settings):
        client = DaemonClient(settings.daemon.api_socket)
        plain = await asyncio.to_thread(client.check_lease, "plain")
        other = await asyncio.to_thread(client.check_lease, "other")
        done = await asyncio.to_thread(config_stage, tmp_path, settings, "plain")
    assert plain == {"profile": "plain", "image": "default", "problems": []}
    assert other["problems"] == [
        "profile 'other' is not allowed for GitLab jobs (allowed: ['default', 'gl', 'plain'])"]
    assert done.returncode == 0, done.stderr
