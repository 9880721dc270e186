"""``snapfleet cache gc``: the decisions as tables, then real cache trees made by
the real builders (fake slow steps) and a real ``snapfleet`` process cleaning them."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner import cache_gc, compose
from runner.cache_gc import Entry, Keep, Kind, plan
from runner.config import load_settings
from runner.images import archives, build_image
from runner.images.cache import Holds, detach
from runner.snapshots import SNAPSHOTS_DIR, SnapshotStore, Vmm
from runner.vm.backend import MachineSpec
from tests.test_images import FakeLayers, make_recipes

DAY = 86400.0
NOW = 1_000_000_000.0


def entry(name: str, kind: Kind, age_days: float, needs: tuple[str, ...] = (),
          owner: int | None = None) -> Entry:
    return Entry(name, kind, NOW - age_days * DAY, {}, frozenset(needs), owner)


TREE = [
    entry("kernel-k", Kind.KERNEL, 30),
    entry("kernel-old", Kind.KERNEL, 30),
    entry("image-cur", Kind.IMAGE, 30, ("kernel-k",)),
    entry("image-old", Kind.IMAGE, 30, ("kernel-old", "downloads/old-x.tgz")),
    entry("image-new", Kind.IMAGE, 2, ("kernel-old",)),
    entry("downloads/old-x.tgz", Kind.DOWNLOAD, 30),
    entry("snapshots/snapshot-cur", Kind.SNAPSHOT, 30, ("image-cur",)),
    entry("snapshots/snapshot-busy", Kind.SNAPSHOT, 30, ("image-old",)),
    entry("snapshots/snapshot-old", Kind.SNAPSHOT, 30, ("image-gone",)),
    entry(".tmp-image-x-1-a", Kind.TEMP, 0, owner=1),
    entry(".tmp-image-x-2-a", Kind.TEMP, 0, owner=2),
]


@pytest.mark.parametrize(("current", "in_use", "keep_days", "expected"), [
    # Nothing current, in use or recent: only the live builder's temp dir stays.
    (set(), set(), 0, {".tmp-image-x-1-a": Keep.BUILDING}),
    # The current snapshot keeps its image, which keeps its kernel.
    ({"snapshots/snapshot-cur"}, set(), 0,
     {"snapshots/snapshot-cur": Keep.CURRENT, "image-cur": Keep.NEEDED,
      "kernel-k": Keep.NEEDED, ".tmp-image-x-1-a": Keep.BUILDING}),
    # A snapshot in use keeps its image, that image's layers and downloads.
    (set(), {"snapshots/snapshot-busy"}, 0,
     {"snapshots/snapshot-busy": Keep.IN_USE, "image-old": Keep.NEEDED,
      "kernel-old": Keep.NEEDED, "downloads/old-x.tgz": Keep.NEEDED,
      ".tmp-image-x-1-a": Keep.BUILDING}),
    # Within the window: the 2-day-old image and (through it) its kernel.
    (set(), set(), 7, {"image-new": Keep.RECENT, "kernel-old": Keep.NEEDED,
                       ".tmp-image-x-1-a": Keep.BUILDING}),
    # Current beats in use beats recent; a dead builder's temp goes even when new.
    ({"image-new"}, {"image-new"}, 7, {"image-new": Keep.CURRENT, "kernel-old": Keep.NEEDED,
                                       ".tmp-image-x-1-a": Keep.BUILDING}),
])
def test_what_stays_and_why(current: set[str], in_use: set[str], keep_days: float,
                            expected: dict[str, Keep]) -> None:
    verdicts = plan(TREE, current, in_use, now=NOW, keep_s=keep_days * DAY,
                    alive=lambda pid: pid == 1)
    assert {v.entry.name: v.keep for v in verdicts if v.keep is not None} == expected
    assert len(verdicts) == len(TREE)


def test_freed_counts_an_inode_once_all_its_links_go() -> None:
    kernel = Entry("kernel-k", Kind.KERNEL, 0, {(1, 10): (4096, 2), (1, 11): (100, 1)})
    image = Entry("image-i", Kind.IMAGE, 0, {(1, 10): (4096, 2), (1, 12): (8192, 1)})
    assert cache_gc.freed([image]) == 8192  # its vmlinux lives on in the kernel layer
    assert cache_gc.freed([image, kernel]) == 4096 + 100 + 8192


@pytest.mark.parametrize(("path", "name"), [
    ("snapshots/snapshot-0123/memory", "snapshots/snapshot-0123"),
    ("image-0123/rootfs.ext4", "image-0123"),
    ("downloads/0123-x.tgz", "downloads/0123-x.tgz"),
    ("snapshots", None),
])
def test_entry_of_a_path(path: str, name: str | None) -> None:
    assert cache_gc.entry_of(path) == name


# --- real trees -------------------------------------------------------------------------

URL = "http://127.0.0.1:9/tools.tar.gz"  # never fetched: the download is already there
OLD_URL = "http://127.0.0.1:9/tools-1.0.tar.gz"


def tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("tool")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    return buf.getvalue()


def age(path: Path, days: float = 30) -> None:
    """Make ``path`` (and all under it) look untouched for ``days``."""
    t = time.time() - days * DAY
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.utime(os.path.join(root, name), (t, t), follow_symlinks=False)
    os.utime(path, (t, t), follow_symlinks=False)


async def fake_template(spec: MachineSpec, disk: Path, memory: Path, state: Path) -> float:
    memory.write_bytes(b"\0" * 65536)  # what a clone maps
    state.write_bytes(b"device state")
    return 0.1


class Site:
    """A config, recipes and a cache dir holding what builds and snapshots really write."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.cache = tmp_path / "cache"
        self.recipes = make_recipes(
            tmp_path, f'[[archives]]\nsource = "{URL}"\ndest = "/opt/tools"\n'
        )
        self.config = tmp_path / "config.toml"
        self.config.write_text(
            f'[paths]\ncache_dir = "{self.cache}"\nstate_dir = "{tmp_path / "state"}"\n'
            f'recipes_dir = "{self.recipes}"\n[net]\nenabled = false\n'
            '[profiles.default]\nimage = "t"\n'
        )
        self.settings = load_settings(self.config)
        self.download = archives.download_path(self.cache, URL)
        self.download.parent.mkdir(parents=True)
        self.download.write_bytes(tarball())

    def agent(self, version: int) -> None:
        (self.tmp / "src/runner/agent/__main__.py").write_text(f"print('agent v{version}')\n")

    async def image_and_snapshot(self, *, snapshot: bool = True) -> tuple[Path, Path | None]:
        """Build the recipe as it is now, and snapshot it as the engine would."""
        image = await build_image("t", cache_dir=self.cache, recipes_dir=self.recipes)
        if not snapshot:
            return image.path, None
        engine = compose.engine(self.settings)
        hv = engine.hypervisor
        store = SnapshotStore(self.cache / SNAPSHOTS_DIR,
                              Vmm(hv.name, await hv.version(), hv.device_layout))
        profile = self.settings.profile()
        made = await store.create(fake_template, image.digest, engine.spec(profile, image),
                                  image.rootfs)
        return image.path, made.path

    def gc(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "runner.cli", "--config", str(self.config), "cache", "gc",
             *args], capture_output=True, text=True, timeout=120, check=False,
        )


def listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture
def mapper() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def map_privately(path: Path, started: list[subprocess.Popen[str]]) -> None:
    """A process holding ``path`` mapped MAP_PRIVATE, as a restored QEMU holds its RAM."""
    code = ("import mmap, sys; f = open(sys.argv[1], 'rb');"
            " m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ);"
            " f.close(); print('ready', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    started.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"


async def test_gc_removes_only_what_is_superseded_and_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapper: list[subprocess.Popen[str]]
) -> None:
    FakeLayers(monkeypatch)
    site = Site(tmp_path)
    site.agent(1)
    old_image, old_snap = await site.image_and_snapshot()
    site.agent(2)
    busy_image, busy_snap = await site.image_and_snapshot()
    site.agent(3)
    recent_image, _ = await site.image_and_snapshot(snapshot=False)
    site.agent(4)
    current_image, current_snap = await site.image_and_snapshot()
    assert old_snap
    assert busy_snap
    assert current_snap
    old_download = archives.download_path(site.cache, OLD_URL)
    old_download.write_bytes(b"an archive no recipe names any more")
    dead_temp = site.cache / ".tmp-image-0123456789abcdef-999999999-abc"
    dead_temp.mkdir()
    (dead_temp / "rootfs.ext4").write_bytes(b"half a disk")
    unknown = [site.cache / "mirror/debian/pool.tar", site.cache / "notes.txt",
               site.cache / "image-not-a-key/x", site.cache / "snapshots/mine/x",
               site.cache / "downloads/.partial.part"]
    for path in unknown:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"someone else's")
    map_privately(busy_snap / "memory", mapper)  # a clone restored from the busy snapshot
    for path in site.cache.iterdir():
        if path != recent_image:
            age(path)
    before = listing(site.cache)

    dry = site.gc("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert listing(site.cache) == before
    assert f"would remove {old_image.name}" in dry.stdout
    assert "would reclaim" in dry.stdout

    done = site.gc()
    assert done.returncode == 0, done.stderr
    gone = {old_image, old_snap, old_download, dead_temp}
    for path in gone:
        assert not path.exists(), path
        assert f"removed {path.relative_to(site.cache).as_posix()} " in done.stdout
    kept = [busy_image, busy_snap, recent_image, current_image, current_snap, site.download,
            *unknown]
    for path in kept:
        assert path.exists(), path
    layers = sorted(p.name for p in site.cache.iterdir() if p.name.startswith(
        ("kernel-", "rootfs-base-", "initramfs-")))
    assert len(layers) == 3  # shared by every version; current
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("reclaimed "), done.stdout
    assert "from 4 entries" in last, done.stdout
    assert "in use" in last
    assert "recently used" in last
    assert "current" in last
    assert not any(p.name.startswith(".tmp-") for p in site.cache.rglob("*"))

    again = site.gc("--keep-days", "0")
    assert f"removed {recent_image.name} " in again.stdout
    assert busy_snap.exists()
    assert current_snap.exists()


async def test_gc_leaves_what_a_running_build_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old config's build reuses layers the current config no longer names."""
    fake = FakeLayers(monkeypatch)
    site = Site(tmp_path)
    old = site.recipes / "old"
    shutil.copytree(site.recipes / "t", old, symlinks=True)
    recipe = (old / "recipe.toml").read_text()
    (old / "recipe.toml").write_text(
        recipe.replace("linux-image-cloud-amd64", "linux-image-6.1.0-9-cloud-amd64")
        .replace('["python3", "iproute2"]', '["python3"]'))
    first = await build_image("old", cache_dir=site.cache, recipes_dir=site.recipes)
    await site.image_and_snapshot(snapshot=False)
    for path in site.cache.iterdir():
        age(path)
    old_layers = [site.cache / str(n) for n in first.manifest["layers"].values()]
    assert all(p.is_dir() for p in old_layers)

    # The rebuild (forced, from the same old layers) stops in its rootfs step.
    release = asyncio.Event()
    in_rootfs = asyncio.Event()
    plain_rootfs = fake.rootfs

    async def slow_rootfs(**kw: object) -> Path:
        in_rootfs.set()
        await release.wait()
        return await plain_rootfs(**kw)  # type: ignore[arg-type]

    monkeypatch.setattr("runner.images.rootfs.build_rootfs_image", slow_rootfs)
    (site.recipes / "old/rootfs/marker").write_text("rebuild the image, reuse its layers\n")
    building = asyncio.create_task(
        build_image("old", cache_dir=site.cache, recipes_dir=site.recipes)
    )
    try:
        await asyncio.wait_for(in_rootfs.wait(), 30)
        done = await asyncio.to_thread(site.gc)
        assert done.returncode == 0, done.stderr
        for path in old_layers:
            assert path.is_dir(), done.stdout
            assert f"removed {path.name}" not in done.stdout
        # The build's locks are open descriptors on them: gc sees a process using them.
        assert "3 in use" in done.stdout
        temps = [p for p in site.cache.iterdir() if p.name.startswith(".tmp-image-")]
        assert temps, "the build's own temp dir is left alone"
        assert f"removed {first.path.name} " in done.stdout  # nothing holds the old image
    finally:
        release.set()
        rebuilt = await building
    assert rebuilt.kernel.is_file()
    assert rebuilt.manifest["layers"] == first.manifest["layers"]


def test_holds_see_an_entry_gc_took_away(tmp_path: Path) -> None:
    layer = tmp_path / "kernel-0123456789abcdef"
    layer.mkdir()
    with Holds() as holds:
        assert holds.take(layer)
        assert detach(layer) is None  # held: gc leaves it
    aside = detach(layer)
    assert aside is not None
    assert not layer.exists()
    with Holds() as holds:
        assert not holds.take(layer)  # a build finds it gone and rebuilds it
