"""The control API's socket keeps other users out (or lets one group in)."""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.api.server import bind_api_socket
from runner.errors import ConfigError, HostError

CONNECT = "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1]); print('in')"


def connect_as(uid: int, gid: int, path: Path, groups: str = "--clear-groups"
               ) -> subprocess.CompletedProcess[str]:
    groups_args = [groups] if groups == "--clear-groups" else ["--groups", groups]
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", *groups_args,
         sys.executable, "-c", CONNECT, str(path)],
        capture_output=True, text=True, timeout=30, check=False,
    )


@pytest.fixture
def open_dir() -> Iterator[Path]:
    # World-traversable all the way up (pytest's tmp_path is not), so only the
    # socket's own mode can keep others out.
    d = Path(tempfile.mkdtemp(prefix="sf-api-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_socket_is_root_only_by_default(open_dir: Path) -> None:
    path = open_dir / "api.sock"
    sock = bind_api_socket(path, None)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        denied = connect_as(65534, 65534, path)
        assert denied.returncode != 0
        assert "PermissionError" in denied.stderr
        # Control: the same user does get in once the mode allows it.
        os.chmod(path, 0o666)
        assert connect_as(65534, 65534, path).stdout.strip() == "in"
        root = subprocess.run([sys.executable, "-c", CONNECT, str(path)],
                              capture_output=True, text=True, timeout=30, check=False)
        assert root.stdout.strip() == "in"
    finally:
        sock.close()


def test_api_group_members_get_in(open_dir: Path) -> None:
    group = grp.getgrgid(100) if _has_gid(100) else grp.getgrgid(os.getgid())
    path = open_dir / "api.sock"
    sock = bind_api_socket(path, group.gr_name)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert path.stat().st_gid == group.gr_gid
        member = connect_as(65534, 65534, path, groups=str(group.gr_gid))
        assert member.stdout.strip() == "in", member.stderr
        outsider = connect_as(65534, 65534, path)
        assert outsider.returncode != 0
    finally:
        sock.close()


def test_a_live_socket_is_not_taken_over_and_a_stale_one_is(open_dir: Path) -> None:
    path = open_dir / "api.sock"
    live = bind_api_socket(path, None)
    try:
        with pytest.raises(HostError, match="in use by another process"):
            bind_api_socket(path, None)
    finally:
        live.close()
    stale = bind_api_socket(path, None)  # the old one no longer listens
    stale.close()


def test_unknown_group_is_a_config_error(open_dir: Path) -> None:
    with pytest.raises(ConfigError, match="group 'no-such-group' does not exist"):
        bind_api_socket(open_dir / "api.sock", "no-such-group")


def _has_gid(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
    except KeyError:
        return False
    return True
