"""GitLab job caches kept on the host, per project (`runner.forge.gitlab.cache`)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from runner.forge.gitlab import cache as cache_mod
from runner.forge.gitlab.cache import ProjectCaches


def test_a_cache_is_kept_private_per_project_and_replaced_whole(tmp_path: Path) -> None:
    root = tmp_path / "runner-7"
    mine, theirs = ProjectCaches(root, 42), ProjectCaches(root, 43)
    mine.store("deps-main", b"zip one")
    mine.store("deps-main", b"zip two")
    assert mine.load(["deps-main"]) == ("deps-main", b"zip two")
    assert theirs.load(["deps-main"]) is None  # another project never sees it
    for path in (root, mine.directory):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    kept = mine.path("deps-main")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert [p.name for p in mine.directory.iterdir()] == [kept.name]  # no temp file left


def test_fallback_keys_are_tried_in_order(tmp_path: Path) -> None:
    caches = ProjectCaches(tmp_path, 1)
    caches.store("deps-main", b"main")
    assert caches.load(["deps-feature", "deps-main"]) == ("deps-main", b"main")
    assert caches.load(["deps-feature"]) is None


def test_keys_that_differ_only_in_odd_characters_do_not_collide(tmp_path: Path) -> None:
    caches = ProjectCaches(tmp_path, 1)
    caches.store("a/b", b"slash")
    caches.store("a_b", b"underscore")
    caches.store("../../escape", b"dots")
    assert caches.load(["a/b"]) == ("a/b", b"slash")
    assert caches.load(["a_b"]) == ("a_b", b"underscore")
    assert all(p.parent == caches.directory for p in caches.directory.iterdir())


def test_a_cache_over_the_limit_is_refused_and_the_old_one_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caches = ProjectCaches(tmp_path, 1)
    caches.store("k", b"small")
    monkeypatch.setattr(cache_mod, "MAX_BYTES", 10)
    with pytest.raises(ValueError, match="cache limit"):
        caches.store("k", b"x" * 11)
    assert caches.load(["k"]) == ("k", b"small")
