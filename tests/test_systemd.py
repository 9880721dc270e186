"""The systemd unit, tmpfiles.d and sysusers.d files: systemd accepts them, and
they agree with the daemon's defaults and command line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runner.cli import _parser
from runner.config import DaemonSettings, PathsSettings

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "snapfleet.service"
TMPFILES = ROOT / "systemd" / "snapfleet.tmpfiles"
SYSUSERS = ROOT / "systemd" / "snapfleet.sysusers"
INSTALLED_BINARY = "/usr/local/bin/snapfleet"

needs = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("systemd-analyze", "systemd-tmpfiles", "systemd-sysusers")),
    reason="systemd tools are not installed",
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chowns files (needs root)")


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists; keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def service(key: str) -> list[str]:
    return [v for k, v in unit_entries(UNIT.read_text())["Service"] if k == key]


def one(key: str) -> str:
    [value] = service(key)
    return value


def seconds(span: str) -> float:
    """A systemd time span (``330s``, ``5min 30s``, ``300``) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit]
    return total


def console_script() -> Path:
    script = Path(sys.executable).parent / "snapfleet"
    assert script.is_file(), "the snapfleet console script is not installed in this venv"
    return script


def verify(unit_text: str, tmp_path: Path) -> str:
    """Run ``systemd-analyze verify`` on a copy; return what it said about the copy."""
    copy = tmp_path / "snapfleet.service"
    copy.write_text(unit_text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    said = "\n".join(
        line for line in (proc.stdout + proc.stderr).splitlines() if "snapfleet" in line
    )
    assert proc.returncode == 0 or said, proc.stderr
    return said


@needs
def test_unit_verifies(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this venv's console
    # script rather than touching /usr/local/bin.
    text = UNIT.read_text()
    assert INSTALLED_BINARY in text
    said = verify(text.replace(INSTALLED_BINARY, str(console_script())), tmp_path)
    # Unknown keys and bad values are only warnings (exit 0), so any line
    # about our unit is a failure.
    assert said == ""


@needs
def test_verify_would_catch_mistakes(tmp_path: Path) -> None:
    text = UNIT.read_text().replace(INSTALLED_BINARY, str(console_script()))
    broken = text.replace("ProtectHome=yes", "ProtectHome=maybe\nKillMod=mixed")
    said = verify(broken, tmp_path)
    assert "ProtectHome" in said or "protect home" in said
    assert "KillMod" in said


def test_unit_lifecycle_settings() -> None:
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("KillMode") == "mixed"
    assert one("Restart") == "on-failure"
    assert one("OOMPolicy") == "continue"
    assert seconds(one("WatchdogSec")) >= 10
    # Room for running jobs to finish, plus the VM teardown after the grace.
    assert seconds(one("TimeoutStopSec")) > DaemonSettings().shutdown_grace_s + 10


def test_exec_start_is_a_valid_command_line() -> None:
    argv = one("ExecStart").split()
    assert argv[0] == INSTALLED_BINARY
    args = _parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert args.config == Path("/etc/snapfleet/config.toml")


def test_unit_directories_match_the_defaults() -> None:
    paths, daemon = PathsSettings(), DaemonSettings()
    assert Path("/var/lib") / one("StateDirectory") == paths.state_dir
    assert Path("/var/cache") / one("CacheDirectory") == paths.cache_dir
    assert Path("/run") / one("RuntimeDirectory") == daemon.api_socket.parent
    assert Path("/run") / one("RuntimeDirectory") == paths.runtime_dir
    # The GitLab journal in it must outlive a crash, a restart and a stop.
    assert one("RuntimeDirectoryPreserve") == "yes"
    assert "/run/netns" in " ".join(service("ReadWritePaths"))


def test_unit_sandbox_leaves_what_the_daemon_needs() -> None:
    assert one("ProtectSystem") == "strict"
    assert one("ProtectKernelTunables") == "no"  # ip_forward, rp_filter
    assert one("RestrictSUIDSGID") == "no"  # guest images carry setuid files
    namespaces = one("RestrictNamespaces").split()
    assert {"net", "mnt"} <= set(namespaces)
    families = one("RestrictAddressFamilies").split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= set(families)
    allowed = {entry.split()[0] for entry in service("DeviceAllow")}
    assert {"/dev/kvm", "/dev/net/tun", "/dev/vfio/vfio", "char-vfio"} <= allowed
    assert one("DevicePolicy") == "closed"
    assert "PrivateDevices" not in dict(unit_entries(UNIT.read_text())["Service"])


@needs
@needs_root
def test_sysusers_and_tmpfiles_apply_to_an_empty_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(["systemd-sysusers", f"--root={root}", str(SYSUSERS)], check=True, timeout=60)
    groups = {
        line.split(":")[0]: int(line.split(":")[2])
        for line in (root / "etc" / "group").read_text().splitlines()
    }
    assert "snapfleet" in groups

    proc = subprocess.run(
        ["systemd-tmpfiles", f"--root={root}", "--create", str(TMPFILES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""

    def mode_and_gid(path: str) -> tuple[int, int]:
        st = (root / path.lstrip("/")).stat()
        return st.st_mode & 0o7777, st.st_gid

    assert mode_and_gid("/etc/snapfleet") == (0o750, groups["snapfleet"])
    assert mode_and_gid("/var/lib/snapfleet") == (int(one("StateDirectoryMode"), 8), 0)
    assert mode_and_gid("/var/cache/snapfleet") == (0o755, 0)
    assert mode_and_gid("/run/snapfleet") == (0o755, 0)
    assert mode_and_gid("/run/netns") == (0o755, 0)


def test_install_script_parses() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "install.sh")], check=True)


@needs
@needs_root
def test_install_systemd_into_a_destdir(tmp_path: Path) -> None:
    # Only the --systemd part of install.sh (no apt, no pip), into a scratch root.
    dest = tmp_path / "root"
    script = (
        "set -euo pipefail; "
        "source <(sed -n '/^install_systemd() {/,/^}/p' scripts/install.sh); "
        "install_systemd"
    )
    proc = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env={**os.environ, "DESTDIR": str(dest)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "not reloaded" in proc.stdout
    assert (dest / "etc/systemd/system/snapfleet.service").read_text() == UNIT.read_text()
    assert (dest / "etc/tmpfiles.d/snapfleet.conf").read_text() == TMPFILES.read_text()
    assert (dest / "etc/sysusers.d/snapfleet.conf").read_text() == SYSUSERS.read_text()
    link = dest / "usr/local/bin/snapfleet"
    assert os.readlink(link) == str(ROOT / ".venv" / "bin" / "snapfleet")
    config = dest / "etc/snapfleet/config.toml"
    assert config.read_text() == (ROOT / "config.example.toml").read_text()
    assert config.stat().st_mode & 0o777 == 0o640
    assert (dest / "var/lib/snapfleet").is_dir()

    # A second run keeps an edited config.
    config.write_text("# edited\n")
    subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env={**os.environ, "DESTDIR": str(dest)},
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    assert config.read_text() == "# edited\n"


GC_SERVICE = ROOT / "systemd" / "snapfleet-cache-gc.service"
GC_TIMER = ROOT / "systemd" / "snapfleet-cache-gc.timer"


@needs
def test_cache_gc_timer_and_service_verify(tmp_path: Path) -> None:
    (tmp_path / GC_TIMER.name).write_text(GC_TIMER.read_text())
    service = tmp_path / GC_SERVICE.name
    service.write_text(GC_SERVICE.read_text().replace(INSTALLED_BINARY, str(console_script())))
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / GC_TIMER.name),
                           str(service)], capture_output=True, text=True, timeout=60)
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "cache-gc" in line]
    assert said == []


def test_cache_gc_service_runs_gc() -> None:
    [start] = [v for k, v in unit_entries(GC_SERVICE.read_text())["Service"] if k == "ExecStart"]
    argv = start.split()
    assert argv[0] == INSTALLED_BINARY
    args = _parser().parse_args(argv[1:])
    assert (args.command, args.action, args.dry_run) == ("cache", "gc", False)
    assert args.config == Path("/etc/snapfleet/config.toml")
