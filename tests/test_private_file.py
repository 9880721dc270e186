"""`write_private`: whole 0600 files, never half of one, nothing left when it fails."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from runner.private_file import write_private


def test_a_private_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_private(tmp_path / "tokens" / "a.token", "glrt-x\n", parent_mode=0o700)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "tokens" / "a.token").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tokens").stat().st_mode) == 0o700
    assert (tmp_path / "tokens" / "a.token").read_text() == "glrt-x\n"


def test_replacing_keeps_the_old_file_until_the_new_one_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    write_private(target, b"old")

    def no_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_disk)
    with pytest.raises(OSError, match="No space"):
        write_private(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp file left


def test_an_existing_parent_is_tightened_only_when_asked(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    write_private(shared / "x", "1")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    write_private(shared / "y", "2", parent_mode=0o700)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o700
