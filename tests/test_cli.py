"""The `snapfleet` command as a user runs it: real processes, real VMs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.config import Settings
from runner.snapshots import Snapshot
from tests.conftest import leftovers

SNAPFLEET = [sys.executable, "-m", "runner.cli"]


@pytest.fixture
def env(settings: Settings, snapshot: Snapshot) -> dict[str, str]:
    """Environment pointing the CLI at the session's (already built) snapshot."""
    return {
        **os.environ,
        "SNAPFLEET_PATHS__STATE_DIR": str(settings.paths.state_dir),
        "SNAPFLEET_PATHS__CACHE_DIR": str(settings.paths.cache_dir),
        "SNAPFLEET_NET__EGRESS": "false",
    }


def snapfleet(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SNAPFLEET, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.vm
def test_run_streams_both_streams_and_passes_the_exit_code(env: dict[str, str]) -> None:
    done = snapfleet("run", "--", "sh", "-c", "uname -a; echo to-stderr >&2; exit 3", env=env)
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("Linux snapfleet-")
    assert "to-stderr" in done.stderr
    assert "to-stderr" not in done.stdout


@pytest.mark.vm
def test_run_options_reach_the_guest(env: dict[str, str]) -> None:
    env = {**env, "DEPLOY_TOKEN": "from-my-env"}
    done = snapfleet("run", "--env", "A=1", "--env", "B=two words", "--env", "DEPLOY_TOKEN",
                     "--workdir", "/srv", "--", "sh", "-c", 'echo "$A|$B|$DEPLOY_TOKEN|$(pwd)"',
                     env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "1|two words|from-my-env|/srv\n"


@pytest.mark.vm
def test_run_timeout_exits_124(env: dict[str, str]) -> None:
    done = snapfleet("run", "--timeout", "2", "--", "sleep", "60", env=env)
    assert done.returncode == 124
    assert "timed out after 2s" in done.stderr


@pytest.mark.vm
def test_sigterm_cancels_the_job_and_cleans_up(env: dict[str, str], state_dir: Path) -> None:
    proc = subprocess.Popen([*SNAPFLEET, "run", "--", "sh", "-c", "echo up; sleep 60"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "up\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    time.sleep(0.2)
    assert not any(leftovers(state_dir).values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--env", "=x", "--", "true"], "--env: expected K=V or K, got '=x'"),
        (["run", "--env", "SNAPFLEET_UNSET_VAR", "--", "true"],
         "--env: SNAPFLEET_UNSET_VAR is not set in this environment"),
        (["run", "--vcpus", "0", "--", "true"], "--vcpus: Input should be greater than or equal"),
        (["run", "--profile", "gpu", "--", "true"], "unknown profile 'gpu'"),
        (["run"], "nothing to run"),
        (["run", "--image", "no-such-image", "--", "true"], "no-such-image"),
    ],
)
def test_bad_input_is_a_clear_error(env: dict[str, str], args: list[str], message: str) -> None:
    done = snapfleet(*args, env=env)
    assert done.returncode == 125
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.vm
def test_doctor_boot_proves_the_accelerator(env: dict[str, str]) -> None:
    done = snapfleet("doctor", "--boot", env=env, timeout=300)
    assert "[ok  ] boot" in done.stdout, done.stdout + done.stderr
    assert "image booted to its agent in" in done.stdout


def test_doctor_reports_the_accelerator(env: dict[str, str]) -> None:
    done = snapfleet("doctor", env=env)
    assert "accelerator" in done.stdout
    assert "qemu" in done.stdout
    if Path("/sys/module/kvm_pvm").exists():
        assert "tcg (KVM is PVM" in done.stdout


@pytest.mark.vm
def test_profile_with_its_own_kernel_and_rootfs(env: dict[str, str], settings: Settings,
                                                tmp_path: Path) -> None:
    from runner.images import find_image

    image = find_image("default", cache_dir=settings.paths.cache_dir)
    assert image is not None
    cfg = tmp_path / "own.toml"
    cfg.write_text(
        "[profiles.default]\n[profiles.own]\n"
        f'kernel = "{image.kernel}"\ninitramfs = "{image.initramfs}"\nrootfs = "{image.rootfs}"\n'
    )
    done = snapfleet("--config", str(cfg), "run", "--profile", "own", "--", "uname", "-r",
                     env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("cloud-amd64")
    missing = tmp_path / "missing.toml"
    missing.write_text(
        "[profiles.default]\n[profiles.own]\n"
        'kernel = "/nope/vmlinux"\ninitramfs = "/nope/initrd"\nrootfs = "/nope/root.ext4"\n'
    )
    bad = snapfleet("--config", str(missing), "run", "--profile", "own", "--", "true", env=env)
    assert bad.returncode == 125
    assert "/nope/vmlinux, which does not exist" in bad.stderr
