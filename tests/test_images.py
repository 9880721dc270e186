"""Guest image builder: recipes, cache keys, layer reuse, and a real boot."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from runner import compose
from runner.agent.messages import Command
from runner.config import Profile, Settings, load_settings
from runner.engine import Engine
from runner.errors import ConfigError, ImageError, SnapshotError
from runner.host import host_tsc_khz
from runner.images import archives, build, build_image, find_image, kernel, load_image_dir, rootfs
from runner.images.initramfs import Entry, newc_archive, resolve_modules, with_parents
from runner.images.kernel import bzimage_payload, candidate_version, real_kernel_package
from runner.images.keys import BuildInputs, gather_inputs, layer_keys
from runner.images.recipe import (
    default_recipes_dir,
    has_gitlab_runner,
    load_recipe,
    parse_recipe,
)
from runner.vm.agent_client import ExecResult, OutputChunk

CACHE_DIR = Path(os.environ.get("SNAPFLEET_CACHE_DIR", "/var/cache/snapfleet"))
MINIMAL: dict[str, object] = {
    "mirror": "http://deb.example/debian",
    "kernel_package": "linux-image-cloud-amd64",
}


# -- recipes -------------------------------------------------------------------


def make_recipes(tmp_path: Path, extra: str = "") -> Path:
    """A recipes dir with recipe ``t`` whose inputs are all small fakes."""
    recipes = tmp_path / "recipes"
    d = recipes / "t"
    (d / "rootfs/sbin").mkdir(parents=True)
    (d / "rootfs/sbin/snapfleet-init").write_text("#!/bin/sh\necho v1\n")
    (d / "rootfs/sbin/snapfleet-init").chmod(0o755)
    (d / "initramfs-init").write_text("#!/bin/sh\necho init v1\n")
    agent = tmp_path / "src/runner/agent"
    agent.mkdir(parents=True)
    (agent.parent / "__init__.py").write_text("")
    (agent.parent / "host_only.py").write_text("HOST = True\n")
    (agent / "__init__.py").write_text("")
    (agent / "__main__.py").write_text("print('agent v1')\n")
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF fake busybox")
    (d / "recipe.toml").write_text(
        f'mirror = "http://deb.example/debian"\n'
        f'kernel_package = "linux-image-cloud-amd64"\n'
        f'packages = ["python3", "iproute2"]\n'
        f'modules = ["virtio_blk"]\n'
        f'busybox = "{busybox}"\n'
        f'agent_source = "{tmp_path / "src"}"\n' + extra
    )
    return recipes


def test_default_recipe_is_valid() -> None:
    loaded = load_recipe("default")
    assert loaded.directory == default_recipes_dir() / "default"
    assert "python3" in loaded.recipe.packages
    assert loaded.recipe.modules[:2] == ("virtio_ring", "virtio")
    assert "root=/dev/vda" in loaded.recipe.cmdline
    init = loaded.overlay_dirs[0] / "sbin/snapfleet-init"
    assert init.stat().st_mode & stat.S_IXUSR


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"rootfs_size_mib": 10}, "rootfs_size_mib", "greater than or equal to 256"),
        ({"packages": ["python3", "Bad Name"]}, "packages.1", "should match pattern"),
        ({"kernel_package": "vim"}, "kernel_package", "linux-image"),
        ({"mirror": "deb.debian.org"}, "mirror", "should match pattern"),
        ({"colour": "blue"}, "colour", "Extra inputs are not permitted"),
        ({"variant": "maxbase"}, "variant", "minbase"),
    ],
)
def test_recipe_errors_name_the_field(change: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_recipe({**MINIMAL, **change}, source="r.toml")
    assert err.value.key == key
    assert words in err.value.reason
    assert "r.toml" in err.value.reason


def test_recipe_missing_field_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_recipe({"kernel_package": "linux-image-cloud-amd64"}, source="r.toml")
    assert err.value.key == "mirror"
    assert "Field required" in err.value.reason

    recipes = make_recipes(tmp_path)
    (recipes / "t/recipe.toml").write_text("suite = [unclosed\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe("t", recipes)


def test_unknown_recipe_lists_available(tmp_path: Path) -> None:
    recipes = make_recipes(tmp_path)
    with pytest.raises(ConfigError, match=r"no recipe 'nope'.*available: t"):
        load_recipe("nope", recipes)
    with pytest.raises(ConfigError, match="invalid image name"):
        load_recipe("../t", recipes)


def test_recipe_missing_files_are_reported(tmp_path: Path) -> None:
    recipes = make_recipes(tmp_path)
    (recipes / "t/initramfs-init").unlink()
    with pytest.raises(ConfigError) as err:
        load_recipe("t", recipes)
    assert err.value.key == "initramfs_init"


# -- cache keys ----------------------------------------------------------------


def keys_for(recipes: Path) -> Any:
    return layer_keys(gather_inputs(load_recipe("t", recipes)))


def test_agent_source_goes_into_guest_files(tmp_path: Path) -> None:
    inputs = gather_inputs(load_recipe("t", make_recipes(tmp_path)))
    assert set(inputs.files) == {
        "sbin/snapfleet-init",
        "opt/snapfleet/runner/__init__.py",
        "opt/snapfleet/runner/agent/__init__.py",
        "opt/snapfleet/runner/agent/__main__.py",
    }
    assert inputs.files["sbin/snapfleet-init"][0] == 0o755
    assert inputs.files["opt/snapfleet/runner/agent/__main__.py"][0] == 0o644


def test_keys_are_stable(tmp_path: Path) -> None:
    recipes = make_recipes(tmp_path)
    assert keys_for(recipes) == keys_for(recipes)


@pytest.mark.parametrize(
    ("edit", "changed"),
    [
        (lambda t, r: (t / "src/runner/agent/__main__.py").write_text("v2"), {"image"}),
        (lambda t, r: (t / "src/runner/agent/new.py").write_text("x"), {"image"}),
        (lambda t, r: (r / "t/rootfs/sbin/snapfleet-init").write_text("v2"), {"image"}),
        (lambda t, r: (r / "t/rootfs/etc").mkdir(), set()),
        (lambda t, r: (t / "src/runner/host_only.py").write_text("v2"), set()),
        (lambda t, r: (t / "src/runner/agent/notes.txt").write_text("x"), set()),
        (lambda t, r: (r / "t/initramfs-init").write_text("v2"), {"initramfs", "image"}),
        (lambda t, r: (t / "busybox").write_bytes(b"v2"), {"initramfs", "image"}),
        (
            lambda t, r: _append(r, "rootfs_size_mib = 4096\n"),
            {"image"},
        ),
        (lambda t, r: _sub(r, '"python3", "iproute2"', '"iproute2", "python3"'), set()),
        (lambda t, r: _sub(r, '"python3",', '"python3", "git",'), {"rootfs_base", "image"}),
        (
            lambda t, r: _sub(r, '["virtio_blk"]', '["virtio_blk", "virtio_net"]'),
            {"initramfs", "image"},
        ),
        (
            lambda t, r: _sub(r, "linux-image-cloud-amd64", "linux-image-amd64"),
            {"kernel", "initramfs", "image"},
        ),
    ],
)
def test_key_changes_only_for_affected_layers(tmp_path: Path, edit: Any, changed: set[str]) -> None:
    recipes = make_recipes(tmp_path)
    before = keys_for(recipes)
    edit(tmp_path, recipes)
    after = keys_for(recipes)
    layers = ("kernel", "rootfs_base", "initramfs", "image")
    assert {n for n in layers if getattr(before, n) != getattr(after, n)} == changed


def _append(recipes: Path, text: str) -> None:
    path = recipes / "t/recipe.toml"
    path.write_text(path.read_text() + text)


def _sub(recipes: Path, old: str, new: str) -> None:
    path = recipes / "t/recipe.toml"
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))


# -- layer reuse (fake layer builders: no debootstrap, no apt) -----------------


class FakeLayers:
    """Stands in for the slow steps and records which ones ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.fail_rootfs = False
        monkeypatch.setattr(kernel, "build_kernel_layer", self.kernel)
        monkeypatch.setattr(rootfs, "build_base_layer", self.base)
        monkeypatch.setattr(build, "build_initramfs_layer", self.initramfs)
        monkeypatch.setattr(rootfs, "build_rootfs_image", self.rootfs)

    async def kernel(self, package: str, out: Path, progress: Any) -> None:
        self.calls.append("kernel")
        (out / "vmlinux").write_bytes(b"\x7fELF kernel")
        (out / "kernel.json").write_text(
            '{"package": "linux-image-9.9-x", "package_version": "9.9-1", "version": "9.9-x"}'
        )

    async def base(self, *, out: Path, **_: Any) -> None:
        self.calls.append("debootstrap")
        (out / "base.tar").write_bytes(b"tar")
        (out / "packages.txt").write_text("python3 3.11.2-1\n")

    async def initramfs(self, *args: Any) -> list[str]:
        self.calls.append("initramfs")
        out = args[5]
        (out / "initramfs.cpio.gz").write_bytes(b"cpio")
        (out / "initramfs.json").write_text('{"modules": ["virtio_blk"]}')
        return ["virtio_blk"]

    async def rootfs(self, *, out: Path, files: dict[str, Any], **_: Any) -> Path:
        self.calls.append("rootfs")
        await asyncio.sleep(0)
        if self.fail_rootfs:
            raise ImageError("mkfs.ext4 failed: disk full")
        (out / "rootfs.ext4").write_bytes(repr(sorted(files)).encode())
        return out / "rootfs.ext4"


async def test_unchanged_recipe_is_not_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeLayers(monkeypatch)
    recipes, cache = make_recipes(tmp_path), tmp_path / "cache"
    assert find_image("t", cache_dir=cache, recipes_dir=recipes) is None

    first = await build_image("t", cache_dir=cache, recipes_dir=recipes)
    assert fake.calls == ["kernel", "debootstrap", "initramfs", "rootfs"]
    assert first.manifest["kernel"]["version"] == "9.9-x"
    assert first.manifest["files"]["rootfs"]["size"] == first.rootfs.stat().st_size
    assert first.kernel.read_bytes() == b"\x7fELF kernel"
    mtime = (first.path / "manifest.json").stat().st_mtime_ns

    messages: list[str] = []
    second = await build_image("t", cache_dir=cache, recipes_dir=recipes, progress=messages.append)
    assert fake.calls == ["kernel", "debootstrap", "initramfs", "rootfs"]
    assert second.path == first.path
    assert (second.path / "manifest.json").stat().st_mtime_ns == mtime
    assert any("cached" in m for m in messages)
    found = find_image("t", cache_dir=cache, recipes_dir=recipes)
    assert found is not None
    assert found.path == first.path


async def test_agent_change_rebuilds_only_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeLayers(monkeypatch)
    recipes, cache = make_recipes(tmp_path), tmp_path / "cache"
    first = await build_image("t", cache_dir=cache, recipes_dir=recipes)
    (tmp_path / "src/runner/agent/__main__.py").write_text("print('agent v2')\n")
    assert find_image("t", cache_dir=cache, recipes_dir=recipes) is None

    second = await build_image("t", cache_dir=cache, recipes_dir=recipes)
    assert fake.calls == ["kernel", "debootstrap", "initramfs", "rootfs", "rootfs"]
    assert second.path != first.path
    assert second.digest != first.digest
    assert first.path.is_dir()  # the old image stays for snapshots made from it

    await build_image("t", cache_dir=cache, recipes_dir=recipes, force=True)
    assert fake.calls[5:] == ["kernel", "debootstrap", "initramfs", "rootfs"]


async def test_failed_build_leaves_no_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeLayers(monkeypatch)
    fake.fail_rootfs = True
    recipes, cache = make_recipes(tmp_path), tmp_path / "cache"
    with pytest.raises(ImageError, match="disk full"):
        await build_image("t", cache_dir=cache, recipes_dir=recipes)
    names = sorted(p.name.rsplit("-", 1)[0] for p in cache.iterdir())
    # Finished layers stay; the failed one leaves neither a layer nor a temp dir.
    assert names == ["initramfs", "kernel", "rootfs-base"]
    assert find_image("t", cache_dir=cache, recipes_dir=recipes) is None


def test_stale_temp_dirs_are_swept(tmp_path: Path) -> None:
    from runner.images.cache import remove_stale_temps

    # 999999999 is above any pid_max, so no live process has it.
    stale = tmp_path / ".tmp-image-0123456789abcdef-999999999-abc"
    mine = tmp_path / f".tmp-image-0123456789abcdef-{os.getpid()}-abc"
    stale.mkdir()
    mine.mkdir()
    assert remove_stale_temps(tmp_path) == [stale]
    assert mine.is_dir()


def test_load_image_dir_checks_files(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"no manifest\.json"):
        load_image_dir(tmp_path)
    for name in ("vmlinux", "initrd", "disk"):
        (tmp_path / name).write_bytes(b"abc")
    files = {
        role: {"file": name, "size": 3, "sha256": "0" * 64}
        for role, name in (("kernel", "vmlinux"), ("initramfs", "initrd"), ("rootfs", "disk"))
    }
    manifest = {"name": "x", "digest": "d", "cmdline": "console=ttyS0", "files": files}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    image = load_image_dir(tmp_path)
    assert image.initramfs == tmp_path / "initrd"
    with pytest.raises(ImageError, match="does not match its sha256"):
        load_image_dir(tmp_path, verify=True)
    (tmp_path / "disk").write_bytes(b"abcd")
    with pytest.raises(ImageError, match="wrong size"):
        load_image_dir(tmp_path)


# -- archives and warm-up ----------------------------------------------------------

TAR_ENV = "SNAPFLEET_TEST_TARBALL"
ARCHIVE_RECIPE = f"""
warmup = "cat /opt/tool/run.sh > /dev/null"

[[archives]]
source = "env:{TAR_ENV}"
dest = "/opt/tool"
hint = "the tool-<ver>.tar.gz path or URL"
"""


def make_tar(
    path: Path,
    files: Mapping[str, tuple[int, bytes]],
    links: Mapping[str, str] | None = None,
) -> Path:
    """A deterministic .tar.gz: fixed mtimes and a non-root owner, like vendor tarballs."""
    buf = io.BytesIO()
    with (
        gzip.GzipFile(filename="", fileobj=buf, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar,
    ):
        dirs = sorted({str(Path(n).parent) for n in files if str(Path(n).parent) != "."})
        for name in dirs:
            tar.addfile(_tarinfo(name, tarfile.DIRTYPE, 0o755))
        for name, (mode, data) in sorted(files.items()):
            tar.addfile(_tarinfo(name, tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))
        for name, target in sorted((links or {}).items()):
            info = _tarinfo(name, tarfile.SYMTYPE, 0o777)
            info.linkname = target
            tar.addfile(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_bytes() != buf.getvalue():
        path.write_bytes(buf.getvalue())
    return path


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size = kind, mode, size
    info.mtime, info.uid, info.gid, info.uname, info.gname = 1_700_000_000, 1001, 1001, "", ""
    return info


TOOL = {"run.sh": (0o755, b"#!/bin/sh\necho tool\n"), "bin/lib.so": (0o644, b"\x7fELF lib")}


def keys_with_archives(recipes: Path, environ: Mapping[str, str]) -> Any:
    loaded = load_recipe("t", recipes)
    found = archives.locate(loaded, recipes / "cache", environ)
    return layer_keys(gather_inputs(loaded, found or ()))


@pytest.mark.parametrize(
    ("archive", "key", "words"),
    [
        ({"source": "x.tgz", "dest": "opt/x"}, "archives.0.dest", "should match pattern"),
        ({"source": "x.tgz", "dest": "/opt/../etc"}, "archives.0.dest", "'..'"),
        ({"source": "x.tgz", "dest": "/"}, "archives.0.dest", "below /"),
        ({"source": "env:1BAD", "dest": "/opt/x"}, "archives.0.source", "variable name"),
        ({"source": "ftp://h/x.tgz", "dest": "/opt/x"}, "archives.0.source", "scheme"),
        ({"source": "x.tgz", "dest": "/x", "sha256": "ABC"}, "archives.0.sha256", "pattern"),
        ({"source": "x.tgz", "dest": "/x", "mode": 1}, "archives.0.mode", "Extra inputs"),
    ],
)
def test_archive_fields_are_checked(archive: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_recipe({**MINIMAL, "archives": [archive]}, source="r.toml")
    assert err.value.key == key
    assert words in err.value.reason
    with pytest.raises(ConfigError, match="warmup"):
        parse_recipe({**MINIMAL, "warmup": "  "}, source="r.toml")


def test_missing_archive_names_the_variable(tmp_path: Path) -> None:
    recipes = make_recipes(tmp_path, ARCHIVE_RECIPE)
    loaded = load_recipe("t", recipes)
    with pytest.raises(ImageError) as err:
        archives.locate(loaded, tmp_path / "cache", {})
    assert f"{TAR_ENV} is not set; set {TAR_ENV} to the tool-<ver>.tar.gz path or URL" in str(
        err.value
    )
    assert "/opt/tool" in str(err.value)
    with pytest.raises(ImageError, match=rf"nope\.tgz does not exist; set {TAR_ENV} to"):
        archives.locate(loaded, tmp_path / "cache", {TAR_ENV: str(tmp_path / "nope.tgz")})
    # Nothing to download, nothing fetched: find_image says the same.
    with pytest.raises(ImageError, match=f"{TAR_ENV} is not set"):
        find_image("t", cache_dir=tmp_path / "cache", recipes_dir=recipes, environ={})


def test_archive_sha256_is_checked(tmp_path: Path) -> None:
    tarball = make_tar(tmp_path / "tool.tgz", TOOL)
    actual = archives.file_sha256(tarball)
    recipes = make_recipes(tmp_path, f'{ARCHIVE_RECIPE}sha256 = "{"0" * 64}"\n')
    with pytest.raises(ImageError, match=f"has sha256 {actual}, but the recipe expects 0000"):
        keys_with_archives(recipes, {TAR_ENV: str(tarball)})
    _sub(recipes, "0" * 64, actual)
    assert keys_with_archives(recipes, {TAR_ENV: str(tarball)}) is not None


def test_archive_key_follows_content_not_path(tmp_path: Path) -> None:
    recipes = make_recipes(tmp_path, ARCHIVE_RECIPE)
    a = make_tar(tmp_path / "a/tool-1.tgz", TOOL)
    moved = make_tar(tmp_path / "b/renamed.tar.gz", TOOL)
    newer = make_tar(tmp_path / "c/tool-2.tgz", {**TOOL, "run.sh": (0o755, b"v2")})
    first = keys_with_archives(recipes, {TAR_ENV: str(a)})
    assert keys_with_archives(recipes, {TAR_ENV: str(moved)}) == first
    assert keys_with_archives(recipes, {TAR_ENV: f"file://{moved}"}) == first
    second = keys_with_archives(recipes, {TAR_ENV: str(newer)})
    assert (second.kernel, second.rootfs_base, second.initramfs) == (
        first.kernel,
        first.rootfs_base,
        first.initramfs,
    )
    assert second.image != first.image


def test_warmup_is_a_guest_script_in_the_image_key(tmp_path: Path) -> None:
    recipes = make_recipes(tmp_path)
    before = keys_for(recipes)
    _append(recipes, 'warmup = "cat /big > /dev/null"\n')
    inputs = gather_inputs(load_recipe("t", recipes))
    assert inputs.files["etc/snapfleet/warmup"] == (0o755, b"#!/bin/sh\ncat /big > /dev/null\n")
    after = layer_keys(inputs)
    assert (before.rootfs_base, before.initramfs) == (after.rootfs_base, after.initramfs)
    assert before.image != after.image


def test_overlays_apply_in_order(tmp_path: Path) -> None:
    recipes = make_recipes(tmp_path)
    (recipes / "mine/etc").mkdir(parents=True)
    (recipes / "mine/etc/motd").write_text("mine")
    (recipes / "mine/sbin").mkdir()
    (recipes / "mine/sbin/snapfleet-init").write_text("#!/bin/sh\necho v2\n")
    _append(recipes, 'overlay = ["rootfs", "../mine"]\n')
    files = gather_inputs(load_recipe("t", recipes)).files
    assert files["etc/motd"] == (0o644, b"mine")
    assert files["sbin/snapfleet-init"] == (0o644, b"#!/bin/sh\necho v2\n")
    _sub(recipes, '"../mine"', '"../none"')
    with pytest.raises(ConfigError, match="none is not a directory"):
        load_recipe("t", recipes)


def test_unpack_makes_root_owned_tree(tmp_path: Path) -> None:
    tarball = make_tar(tmp_path / "tool.tgz", TOOL, links={"bin/current": "lib.so"})
    root = tmp_path / "root"
    (root / "opt").mkdir(parents=True)
    archives.unpack(tarball, root, "/opt/tool")
    run = root / "opt/tool/run.sh"
    assert run.read_bytes() == TOOL["run.sh"][1]
    assert stat.S_IMODE(run.stat().st_mode) == 0o755
    assert (run.stat().st_uid, run.stat().st_gid) == (0, 0)
    assert stat.S_IMODE((root / "opt/tool/bin").stat().st_mode) == 0o755
    assert os.readlink(root / "opt/tool/bin/current") == "lib.so"


@pytest.mark.parametrize(
    ("files", "links", "words"),
    [
        ({"../evil": (0o644, b"x")}, None, "outside its destination"),
        ({"a/../../evil": (0o644, b"x")}, None, "outside its destination"),
        ({"/etc/evil": (0o644, b"x")}, None, "outside its destination"),
        ({}, {"escape": "/etc"}, "links outside"),
        ({}, {"a/escape": "../../etc"}, "links outside"),
    ],
)
def test_unpack_refuses_path_traversal(
    tmp_path: Path, files: dict[str, tuple[int, bytes]], links: dict[str, str] | None, words: str
) -> None:
    tarball = make_tar(tmp_path / "bad.tgz", files, links)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ImageError, match=words):
        archives.unpack(tarball, root, "/opt/tool")
    assert not (tmp_path / "evil").exists()
    assert not (root / "opt/evil").exists()
    assert list((root / "opt/tool").iterdir()) == []


def test_unpack_refuses_a_dest_through_an_absolute_symlink(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "opt").symlink_to(tmp_path / "outside")
    with pytest.raises(ImageError, match="leads out of the guest tree"):
        archives.unpack(make_tar(tmp_path / "t.tgz", TOOL), root, "/opt/tool")
    not_tar = tmp_path / "not.tgz"
    not_tar.write_bytes(b"<html>404</html>")
    with pytest.raises(ImageError, match="not a tar archive"):
        archives.unpack(not_tar, tmp_path / "root2", "/opt/tool")


# -- single-file archives (format = "file") ------------------------------------

BIN_ENV = "SNAPFLEET_TEST_BINARY"
FILE_RECIPE = f"""
[[archives]]
source = "env:{BIN_ENV}"
dest = "/usr/local/bin/gitlab-runner"
format = "file"
hint = "the gitlab-runner-linux-amd64 path or URL"
"""
STANDIN_BINARY = b"#!/bin/sh\necho gitlab-runner stand-in\n"


def standin_binary(path: Path, data: bytes = STANDIN_BINARY) -> Path:
    """An operator's download: not executable, not root's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)
    os.chown(path, 1001, 1001)
    return path


def test_file_archives_are_validated() -> None:
    recipe = parse_recipe(
        {**MINIMAL, "archives": [{"source": "env:X", "dest": "/usr/bin/x", "format": "file"}]},
        source="r.toml",
    )
    assert recipe.archives[0].format == "file"
    assert parse_recipe({**MINIMAL, "archives": [{"source": "x.tgz", "dest": "/x"}]},
                        source="r.toml").archives[0].format == "tar"
    with pytest.raises(ConfigError) as err:
        parse_recipe({**MINIMAL, "archives": [{"source": "x", "dest": "/x", "format": "zip"}]},
                     source="r.toml")
    assert err.value.key == "archives.0.format"
    assert "'tar' or 'file'" in err.value.reason


def test_missing_file_archive_says_what_to_provide(tmp_path: Path) -> None:
    loaded = load_recipe("t", make_recipes(tmp_path, FILE_RECIPE))
    with pytest.raises(ImageError) as err:
        archives.locate(loaded, tmp_path / "cache", {})
    assert str(err.value) == (
        f"{BIN_ENV} is not set; set {BIN_ENV} to the gitlab-runner-linux-amd64 path or URL"
        " (the image installs it as /usr/local/bin/gitlab-runner)"
    )


def test_file_archive_key_follows_content_and_format_not_path(tmp_path: Path) -> None:
    recipes = make_recipes(tmp_path, FILE_RECIPE)
    a = standin_binary(tmp_path / "a/gitlab-runner-linux-amd64")
    moved = standin_binary(tmp_path / "b/renamed")
    newer = standin_binary(tmp_path / "c/gitlab-runner-linux-amd64", b"v2")
    first = keys_with_archives(recipes, {BIN_ENV: str(a)})
    assert keys_with_archives(recipes, {BIN_ENV: str(moved)}) == first
    second = keys_with_archives(recipes, {BIN_ENV: str(newer)})
    assert (second.kernel, second.rootfs_base, second.initramfs) == (
        first.kernel, first.rootfs_base, first.initramfs
    )
    assert second.image != first.image
    # The same bytes unpacked as a tarball would make another tree: another key.
    _sub(recipes, 'format = "file"', 'format = "tar"')
    assert keys_with_archives(recipes, {BIN_ENV: str(a)}).image != first.image
    _sub(recipes, 'format = "tar"', 'format = "file"')
    _append(recipes, f'sha256 = "{"0" * 64}"\n')
    with pytest.raises(ImageError, match="but the recipe expects 0000"):
        keys_with_archives(recipes, {BIN_ENV: str(a)})


# Image keys of a tarball-only recipe and one without archives, from before single-file
# archives existed: those images must not rebuild. (Update these only when a layer's
# format is bumped on purpose.)
TAR_ONLY_IMAGE_KEY = "7d9dd251d6c2305ea3d70439bccd99e403f6db09aa67868c0da503ca96b977d6"
NO_ARCHIVES_IMAGE_KEY = "0641b447643b0cede967f7220dbf7e4502bcd2b388b3f92c72101af2951ca974"


def test_tarball_only_keys_are_unchanged(tmp_path: Path) -> None:
    tarball = make_tar(tmp_path / "tool.tgz", TOOL)
    recipes = make_recipes(tmp_path, ARCHIVE_RECIPE)
    assert keys_with_archives(recipes, {TAR_ENV: str(tarball)}).image == TAR_ONLY_IMAGE_KEY
    _append(recipes, 'format = "tar"\n')
    assert keys_with_archives(recipes, {TAR_ENV: str(tarball)}).image == TAR_ONLY_IMAGE_KEY
    assert keys_for(make_recipes(tmp_path / "plain")).image == NO_ARCHIVES_IMAGE_KEY


def test_install_file_makes_a_root_owned_executable(tmp_path: Path) -> None:
    binary = standin_binary(tmp_path / "gitlab-runner-linux-amd64")
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")  # merged /usr, as in Debian's tree
    for dest in ("/usr/local/bin/gitlab-runner", "/bin/helper"):
        archives.install_file(binary, root, dest)
    for installed in (root / "usr/local/bin/gitlab-runner", root / "usr/bin/helper"):
        st = installed.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)
        assert installed.read_bytes() == STANDIN_BINARY
    assert stat.S_IMODE((root / "usr/local").stat().st_mode) == 0o755
    archives.install_file(standin_binary(tmp_path / "v2", b"v2"), root, "/bin/helper")
    assert (root / "usr/bin/helper").read_bytes() == b"v2"


def test_install_file_refuses_to_leave_the_tree_or_replace_a_dir(tmp_path: Path) -> None:
    binary = standin_binary(tmp_path / "bin")
    root = tmp_path / "root"
    (root / "usr/local/bin/gitlab-runner").mkdir(parents=True)
    (root / "opt").symlink_to(tmp_path / "outside")
    with pytest.raises(ImageError, match="leads out of the guest tree"):
        archives.install_file(binary, root, "/opt/tool")
    assert not (tmp_path / "outside").exists()
    with pytest.raises(ImageError, match="is a directory or symlink"):
        archives.install_file(binary, root, "/usr/local/bin/gitlab-runner")
    assert list((root / "usr/local/bin/gitlab-runner").iterdir()) == []


@pytest.mark.parametrize(
    ("change", "has"),
    [
        ({}, False),
        ({"packages": ["python3", "gitlab-runner"]}, True),
        ({"archives": [{"source": "x", "dest": "/usr/local/bin/gitlab-runner",
                        "format": "file"}]}, True),
        ({"archives": [{"source": "x", "dest": "/usr/bin/gitlab-runner", "format": "file"}]},
         True),
        ({"archives": [{"source": "x", "dest": "/opt/gitlab-runner", "format": "file"}]}, False),
        ({"archives": [{"source": "x.tgz", "dest": "/usr/local/bin/gitlab-runner"}]}, False),
    ],
)
def test_which_recipes_carry_the_gitlab_runner_helper(change: dict[str, Any], has: bool) -> None:
    assert has_gitlab_runner(parse_recipe({**MINIMAL, **change}, source="r.toml")) is has


def test_shipped_gitlab_runner_recipe_shares_the_default_layers(tmp_path: Path) -> None:
    shipped = load_recipe("gitlab-runner")
    assert has_gitlab_runner(shipped.recipe)
    assert not has_gitlab_runner(load_recipe("default").recipe)
    [archive] = shipped.recipe.archives
    assert (archive.source, archive.format) == ("env:SNAPFLEET_GITLAB_RUNNER_BINARY", "file")
    assert archive.hint is not None
    assert "gitlab-runner-linux-amd64" in archive.hint
    binary = standin_binary(tmp_path / "gitlab-runner-linux-amd64")
    found = archives.locate(shipped, tmp_path, {"SNAPFLEET_GITLAB_RUNNER_BINARY": str(binary)})
    assert found is not None
    mine = layer_keys(gather_inputs(shipped, found))
    default = layer_keys(gather_inputs(load_recipe("default")))
    assert (mine.kernel, mine.rootfs_base, mine.initramfs) == (
        default.kernel, default.rootfs_base, default.initramfs
    )


async def test_a_built_image_has_the_file_at_its_dest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real rootfs step (untar, install, mkfs.ext4) over a small base tree."""
    real_rootfs = rootfs.build_rootfs_image
    FakeLayers(monkeypatch)
    monkeypatch.setattr(rootfs, "build_rootfs_image", real_rootfs)

    async def tiny_base(*, out: Path, **_: Any) -> None:
        tree = out / "tree"
        (tree / "usr/bin").mkdir(parents=True)
        (tree / "bin").symlink_to("usr/bin")
        subprocess.run(["tar", "--numeric-owner", "-C", tree, "-cf", out / "base.tar", "."],
                       check=True)
        shutil.rmtree(tree)
        (out / "packages.txt").write_text("python3 3.11.2-1\n")

    monkeypatch.setattr(rootfs, "build_base_layer", tiny_base)
    # A tarball and a single file, in the recipe's order.
    recipes = make_recipes(tmp_path, "rootfs_size_mib = 256\n" + ARCHIVE_RECIPE + FILE_RECIPE)
    binary = standin_binary(tmp_path / "dl/gitlab-runner-linux-amd64")
    tarball = make_tar(tmp_path / "dl/tool.tgz", TOOL)
    messages: list[str] = []
    image = await build_image("t", cache_dir=tmp_path / "cache", recipes_dir=recipes,
                              environ={BIN_ENV: str(binary), TAR_ENV: str(tarball)},
                              progress=messages.append)
    put = [m for m in messages if m.startswith(("unpacking tool", "installing"))]
    assert put == ["unpacking tool.tgz into /opt/tool",
                   "installing gitlab-runner-linux-amd64 as /usr/local/bin/gitlab-runner"]
    assert image.manifest["rootfs"]["archives"][1] == {
        "source": f"env:{BIN_ENV}", "file": "gitlab-runner-linux-amd64",
        "dest": "/usr/local/bin/gitlab-runner", "sha256": archives.file_sha256(binary),
        "format": "file",
    }
    assert "format" not in image.manifest["rootfs"]["archives"][0]

    def debugfs(request: str) -> str:
        return subprocess.run(["debugfs", "-R", request, str(image.rootfs)], check=True,
                              capture_output=True, text=True).stdout

    inode = debugfs("stat /usr/local/bin/gitlab-runner")
    assert "Type: regular    Mode:  0755" in inode
    assert "User:     0   Group:     0" in inode
    assert debugfs("cat /usr/local/bin/gitlab-runner").encode() == STANDIN_BINARY
    assert "Mode:  0755" in debugfs("stat /usr/local/bin")
    assert debugfs("cat /opt/tool/run.sh").encode() == TOOL["run.sh"][1]


async def test_archive_url_is_downloaded_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeLayers(monkeypatch)
    unpacked: list[Any] = []
    real_rootfs = fake.rootfs

    async def rootfs_with_archives(*, archives: Any = (), **kw: Any) -> Path:
        unpacked.append(archives)
        return await real_rootfs(**kw)

    monkeypatch.setattr(rootfs, "build_rootfs_image", rootfs_with_archives)
    body = make_tar(tmp_path / "served.tgz", TOOL).read_bytes()
    hits: list[str] = []

    async def serve(request: web.Request) -> web.Response:
        hits.append(request.path_qs)
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/dl/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        recipes, cache = make_recipes(tmp_path, ARCHIVE_RECIPE), tmp_path / "cache"
        env = {TAR_ENV: f"http://127.0.0.1:{port}/dl/tool-1.tgz?token=s3cret"}
        assert find_image("t", cache_dir=cache, recipes_dir=recipes, environ=env) is None
        messages: list[str] = []
        image = await build_image(
            "t", cache_dir=cache, recipes_dir=recipes, environ=env, progress=messages.append
        )
        assert not any("s3cret" in m for m in messages)
        assert hits == ["/dl/tool-1.tgz?token=s3cret"]
        [found_archive] = unpacked[0]
        dest, path = found_archive.dest, found_archive.path
        assert (dest, found_archive.format) == ("/opt/tool", "tar")
        assert path.parent == cache / "downloads"
        assert path.read_bytes() == body
        assert image.warmup == "cat /opt/tool/run.sh > /dev/null"
        assert image.manifest["rootfs"]["archives"] == [
            {
                "source": f"env:{TAR_ENV}",
                "file": path.name,
                "dest": "/opt/tool",
                "sha256": archives.file_sha256(path),
            }
        ]
        found = find_image("t", cache_dir=cache, recipes_dir=recipes, environ=env)
        assert found is not None
        assert found.path == image.path
        assert found.warmup == image.warmup
        assert hits == ["/dl/tool-1.tgz?token=s3cret"]

        env = {TAR_ENV: f"http://127.0.0.1:{port}/missing"}
        app_404 = "cannot download http://127.0.0.1"
        with pytest.raises(ImageError, match=app_404):
            await build_image("t", cache_dir=cache, recipes_dir=recipes, environ=env)
    finally:
        await runner.cleanup()


def test_old_manifests_have_no_warmup(tmp_path: Path) -> None:
    for name in ("vmlinux", "initrd", "disk"):
        (tmp_path / name).write_bytes(b"abc")
    files = {
        role: {"file": name, "size": 3, "sha256": "0" * 64}
        for role, name in (("kernel", "vmlinux"), ("initramfs", "initrd"), ("rootfs", "disk"))
    }
    manifest = {"name": "x", "digest": "d", "cmdline": "c", "files": files}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert load_image_dir(tmp_path).warmup is None
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "warmup": "true"}))
    assert load_image_dir(tmp_path).warmup == "true"


class FakeWarmupMachine:
    """Just enough of a QemuMachine for Engine._template."""

    def __init__(self, result: ExecResult, output: bytes) -> None:
        self.result, self.output = result, output
        self.scripts: list[str | None] = []
        self.saved = self.destroyed = False

    async def exec(self, command: Command) -> Any:
        self.scripts.append(command.script)
        return FakeSession(
            self.result if command.script else ExecResult(0, None, False, False), self.output
        )

    async def save_snapshot(self, state: Path) -> None:
        self.saved = True

    async def destroy(self) -> None:
        self.destroyed = True


class FakeSession:
    def __init__(self, result: ExecResult, output: bytes) -> None:
        self.result, self.chunks = result, [OutputChunk("stderr", output)]

    def __aiter__(self) -> FakeSession:
        return self

    async def __anext__(self) -> OutputChunk:
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop()

    async def wait(self) -> ExecResult:
        return self.result


@pytest.mark.parametrize("exit_code", [0, 1])
async def test_template_runs_the_warmup_before_saving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exit_code: int
) -> None:
    settings: Settings = load_settings(
        None, paths={"cache_dir": tmp_path, "state_dir": tmp_path}, net={"enabled": False}
    )
    engine = compose.engine(settings)
    machine = FakeWarmupMachine(ExecResult(exit_code, None, False, False), b"cat: no such file")

    async def boot_template(*_: Any) -> FakeWarmupMachine:
        return machine

    monkeypatch.setattr(engine.hypervisor, "boot_template", boot_template)
    args = (engine.spec(Profile(), _fake_image(tmp_path)), tmp_path / "d", tmp_path / "m")
    if exit_code:
        with pytest.raises(SnapshotError, match=r"warm-up /etc/snapfleet/warmup failed \(exit 1"):
            await engine._template(*args, tmp_path / "s")
        assert not machine.saved
    else:
        await engine._template(*args, tmp_path / "s")
        assert machine.saved
    assert machine.destroyed
    assert machine.scripts[0] is not None
    assert "/etc/snapfleet/warmup" in machine.scripts[0]


def _fake_image(tmp_path: Path) -> Any:
    from runner.images import Image

    kernel, initramfs, disk = (tmp_path / n for n in ("vmlinux", "initrd", "disk"))
    return Image("x", "d", tmp_path, kernel, initramfs, disk, "console=ttyS0", {})


# -- pure pieces -----------------------------------------------------------------


def fake_bzimage(payload: bytes, setup_sects: int = 2, offset: int = 0x40) -> bytes:
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, 0x20F)
    struct.pack_into("<II", head, 0x248, offset, len(payload))
    return bytes(head) + b"\0" * offset + payload + b"trailing"


def test_bzimage_payload_strips_the_size_trailer() -> None:
    stream = b"\x02\x21\x4c\x18compressed"
    payload, size = bzimage_payload(fake_bzimage(stream + struct.pack("<I", 12345)))
    assert (payload, size) == (stream, 12345)
    gz = b"\x1f\x8b" + b"x" * 10
    with pytest.raises(ImageError, match="gzip, only LZ4"):
        bzimage_payload(fake_bzimage(gz))
    with pytest.raises(ImageError, match="not a bzImage"):
        bzimage_payload(b"\0" * 4096)


def test_real_kernel_package_resolution() -> None:
    out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n"
    assert real_kernel_package("linux-image-cloud-amd64", out) == "linux-image-6.1.0-56-cloud-amd64"
    assert real_kernel_package("linux-image-6.1.0-9-amd64", "") == "linux-image-6.1.0-9-amd64"
    with pytest.raises(ImageError, match="no linux-image"):
        real_kernel_package("linux-image-cloud-amd64", "  Depends: kmod\n")
    assert candidate_version("x:\n  Installed: (none)\n  Candidate: 6.1.192-2\n") == "6.1.192-2"
    with pytest.raises(ImageError, match="apt-get update"):
        candidate_version("x:\n  Candidate: (none)\n")


def test_module_order_puts_dependencies_first() -> None:
    available = {n: n for n in ("virtio_ring", "virtio", "virtio_blk", "virtio_rng", "failover")}
    deps = {
        "virtio": ["virtio_ring"],
        "virtio_blk": ["virtio", "virtio_ring"],
        "virtio_rng": ["virtio", "virtio_ring"],
    }
    order = resolve_modules(["virtio_blk", "virtio-rng", "ext4"], available, {"ext4"}, deps)
    assert order == ["virtio_ring", "virtio", "virtio_blk", "virtio_rng"]
    with pytest.raises(ConfigError, match=r"no module 'nope' \(needed by virtio\)"):
        resolve_modules(["virtio"], available, set(), {"virtio": ["nope"]})


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """Parse a newc archive into {path: (mode, data, rdev)}."""
    out: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos : pos + filesize]
        pos = (pos + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (f[1], body, (f[9], f[10]))


def test_newc_archive_round_trip() -> None:
    entries = with_parents(
        [
            Entry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\n"),
            Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
            Entry("usr/bin/[", stat.S_IFLNK | 0o777, b"/bin/busybox"),
        ]
    )
    parsed = read_newc(newc_archive(entries))
    assert list(parsed) == ["init", "dev", "dev/console", "usr", "usr/bin", "usr/bin/["]
    assert parsed["init"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\n", (0, 0))
    assert parsed["dev/console"][2] == (5, 1)
    assert stat.S_ISDIR(parsed["usr/bin"][0])
    if shutil.which("cpio"):
        listing = (
            subprocess.run(
                ["cpio", "-t"], input=newc_archive(entries), capture_output=True, check=True
            )
            .stdout.decode()
            .split()
        )
        assert "usr/bin/[" in listing


def test_build_inputs_are_pure_data() -> None:
    recipe = parse_recipe(MINIMAL, source="x")
    a = BuildInputs("n", recipe, b"init", "b" * 64, {"x": (0o644, b"1")})
    b = BuildInputs("n", recipe, b"init", "b" * 64, {"x": (0o644, b"2")})
    assert layer_keys(a).rootfs_base == layer_keys(b).rootfs_base
    assert layer_keys(a).image != layer_keys(b).image


# -- the real thing ----------------------------------------------------------------


def qemu_argv(image: Any, disk: Path, sock: Path, append: str = "") -> list[str]:
    return [
        "qemu-system-x86_64",
        "-M",
        "microvm,pit=on",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "512",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initramfs),
        "-append",
        # As the engine does under TCG: spare the kernel PIT calibration, which
        # fails (and hangs the boot) when the host is busy.
        f"{image.cmdline} {_tsc_hint()} {append}".strip(),
        "-drive",
        f"id=root,file={disk},format=qcow2,if=none",
        "-device",
        "virtio-blk-device,drive=root",
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-device,netdev=n0",
        "-device",
        "virtio-serial-device",
        "-chardev",
        f"socket,id=agent,path={sock},server=on,wait=off",
        "-device",
        "virtserialport,chardev=agent,name=org.snapfleet.agent",
    ]


async def boot(
    image: Any,
    tmp_path: Path,
    until: str,
    *,
    append: str = "",
    timeout: float = 60,
    linger: float = 0,
) -> str:
    """Boot a COW overlay of the image under TCG; return the serial log.

    Stops at ``until`` (plus ``linger`` seconds) or when QEMU exits.
    """
    disk = tmp_path / "overlay.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(image.rootfs),
            "-F",
            "raw",
            str(disk),
        ],
        check=True,
    )
    proc = await asyncio.create_subprocess_exec(
        *qemu_argv(image, disk, tmp_path / "agent.sock", append),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    log = b""
    try:
        async with asyncio.timeout(timeout):
            while until.encode() not in log and (chunk := await proc.stdout.read(4096)):
                log += chunk
        if linger:
            try:
                async with asyncio.timeout(linger):
                    while chunk := await proc.stdout.read(4096):
                        log += chunk
            except TimeoutError:
                pass
    except TimeoutError:
        pytest.fail(f"no {until!r} within {timeout}s; serial log:\n{log.decode()[-3000:]}")
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    return log.decode(errors="replace")


@pytest.fixture(scope="module")
async def default_image() -> Any:
    start = time.monotonic()
    image = await build_image(
        "default", cache_dir=CACHE_DIR, progress=lambda m: print(f"[image] {m}", flush=True)
    )
    print(f"[image] ready in {time.monotonic() - start:.1f}s: {image.path}")
    return image


@pytest.mark.vm
async def test_default_image_boots_to_agent(default_image: Any, tmp_path: Path) -> None:
    image = default_image
    assert image.kernel.read_bytes()[:4] == b"\x7fELF"
    assert gzip.decompress(image.initramfs.read_bytes())[:6] == b"070701"
    assert image.manifest["kernel"]["version"].endswith("-cloud-amd64")
    pristine = image.rootfs.stat().st_mtime_ns

    log = await boot(image, tmp_path, "snapfleet-init: starting agent", linger=3)
    # The agent is PID 1: had it died, the kernel would have panicked.
    assert "Kernel panic" not in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert "EXT4-fs (vda): mounted filesystem" in log
    assert image.rootfs.stat().st_mtime_ns == pristine


@pytest.mark.vm
async def test_guest_init_configures_network(default_image: Any, tmp_path: Path) -> None:
    """snapfleet-init under a stand-in agent that reports what it sees and powers off."""
    recipes = tmp_path / "recipes"
    shutil.copytree(default_recipes_dir() / "default", recipes / "probe")
    agent = tmp_path / "src/runner/agent"
    agent.mkdir(parents=True)
    (agent.parent / "__init__.py").write_text("")
    (agent / "__init__.py").write_text("")
    (agent / "__main__.py").write_text(PROBE_AGENT)
    recipe = recipes / "probe/recipe.toml"
    recipe.write_text(recipe.read_text() + f'agent_source = "{tmp_path / "src"}"\n')
    image = await build_image("probe", cache_dir=CACHE_DIR, recipes_dir=recipes)
    assert image.manifest["layers"] == default_image.manifest["layers"]

    log = await boot(
        image,
        tmp_path,
        "probe: done",
        append=("snapfleet.ip=10.0.2.15/24 snapfleet.gw=10.0.2.2 snapfleet.dns=10.0.2.3,1.1.1.1"),
    )
    assert "probe: pid 1" in log
    assert "inet 10.0.2.15/24" in log
    assert "default via 10.0.2.2 dev eth0" in log
    assert "nameserver 10.0.2.3 nameserver 1.1.1.1" in log
    assert "probe: hostname snapfleet" in log
    assert "probe: ports ['org.snapfleet.agent']" in log
    for mount in ("/dev/pts", "/dev/shm", "/run", "/tmp"):
        assert f"probe: mounted {mount}" in log


@pytest.mark.vm
async def test_missing_root_disk_powers_off(default_image: Any, tmp_path: Path) -> None:
    log = await boot(
        default_image, tmp_path, "reboot: Power down", append="root=/dev/vdz", timeout=60
    )
    assert "snapfleet-initramfs: FATAL: root device /dev/vdz did not appear" in log


PROBE_AGENT = r"""
import ctypes, os, socket, subprocess
def say(msg): print("probe:", msg, flush=True)
say(f"pid {os.getpid()}")
say(subprocess.run(["ip", "-4", "addr", "show", "eth0"], capture_output=True, text=True).stdout)
say(subprocess.run(["ip", "route"], capture_output=True, text=True).stdout)
say(" ".join(open("/etc/resolv.conf").read().split()))
say(f"hostname {socket.gethostname()}")
say(f"ports {sorted(os.listdir('/dev/virtio-ports'))}")
mounts = [line.split()[1] for line in open("/proc/mounts")]
for m in mounts:
    say(f"mounted {m}")
say("done")
os.sync()
ctypes.CDLL(None).reboot(0x4321FEDC)  # RB_POWER_OFF
"""


def _tsc_hint() -> str:
    khz = host_tsc_khz()
    return f"tsc_early_khz={khz}" if khz else ""


# -- the GitHub runner image -----------------------------------------------------------

# Stands in for GitHub's run.sh: checks the JIT config the way the real runner
# receives it (base64 JSON in ACTIONS_RUNNER_INPUT_JITCONFIG, never in an argv).
STANDIN_RUN_SH = b"""#!/bin/sh
if [ "${RUNNER_ALLOW_RUNASROOT:-}" != 1 ]; then
    echo "snapfleet-test-runner: RUNNER_ALLOW_RUNASROOT is not 1" >&2
    exit 4
fi
exec python3 -c '
import base64, glob, json, os, sys
raw = os.environ.get("ACTIONS_RUNNER_INPUT_JITCONFIG", "")
for path in glob.glob("/proc/[0-9]*/cmdline"):
    try:
        with open(path, "rb") as f:
            if raw and raw.encode() in f.read():
                sys.exit("snapfleet-test-runner: the JIT config is in an argv")
    except OSError:
        pass
try:
    config = json.loads(base64.b64decode(raw, validate=True))
except ValueError:
    config = None
if not isinstance(config, dict) or "runner_id" not in config or "secret" not in config:
    print("snapfleet-test-runner: malformed JIT config", file=sys.stderr)
    sys.exit(3)
print("snapfleet-test-runner: jit ok runner_id=%s" % config["runner_id"])
'
"""


def standin_runner_tarball(directory: Path) -> Path:
    """A deterministic actions-runner stand-in (same bytes every run: the image stays cached)."""
    return make_tar(
        directory / "actions-runner-linux-x64-standin.tar.gz",
        {
            "run.sh": (0o755, STANDIN_RUN_SH),
            "bin/Runner.Listener": (0o755, b"#!/bin/sh\nexit 0\n"),
            "config.sh": (0o755, b"#!/bin/sh\nexit 0\n"),
        },
    )


async def guest_run(machine: Any, argv: list[str], env: dict[str, str]) -> tuple[int | None, str]:
    session = await machine.exec(Command(argv=argv, env=env, timeout=60))
    out = b"".join([chunk.data async for chunk in session])
    return (await session.wait()).exit_code, out.decode(errors="replace")


@pytest.mark.vm
async def test_github_runner_image_runs_a_jit_job(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball = standin_runner_tarball(CACHE_DIR / "test-inputs")
    monkeypatch.setenv("SNAPFLEET_RUNNER_TARBALL", str(tarball))
    start = time.monotonic()
    image = await build_image(
        "github-runner", cache_dir=CACHE_DIR, progress=lambda m: print(f"[image] {m}", flush=True)
    )
    print(f"[image] github-runner ready in {time.monotonic() - start:.1f}s: {image.path}")
    assert image.warmup is not None
    assert "/opt/actions-runner/bin/*" in image.warmup
    default = load_recipe("default")
    assert image.manifest["layers"]["kernel"].startswith("kernel-")
    assert "libicu72" in image.manifest["rootfs"]["packages"]
    assert layer_keys(gather_inputs(default)).initramfs.startswith(
        image.manifest["layers"]["initramfs"].removeprefix("initramfs-")
    )

    # The template runs the warm-up before it is saved.
    snapshot = await engine.snapshot(
        Profile(image="github-runner"), lambda m: print(f"[setup] {m}", flush=True)
    )
    machine = await engine.restore(snapshot, use_pool=False)
    try:
        # Only the warm-up reads config.sh: its pages came with the snapshot.
        resident = ["fincore", "--noheadings", "--output", "PAGES", "/opt/actions-runner/config.sh"]
        code, out = await guest_run(machine, resident, {})
        assert (code, out.strip()) == (0, "1"), out

        secret = "s3cret-" + os.urandom(8).hex()
        jit = base64.b64encode(json.dumps({"runner_id": 42, "secret": secret}).encode()).decode()
        script = ["/usr/local/bin/snapfleet-github-runner"]
        code, out = await guest_run(machine, script, {"ACTIONS_RUNNER_INPUT_JITCONFIG": jit})
        assert (code, out) == (0, "snapfleet-test-runner: jit ok runner_id=42\n")
        assert secret not in out

        bad = base64.b64encode(b'["runner_id"]').decode()
        code, out = await guest_run(machine, script, {"ACTIONS_RUNNER_INPUT_JITCONFIG": bad})
        assert code == 3, out
        code, out = await guest_run(machine, script, {})
        assert code == 2
        assert "ACTIONS_RUNNER_INPUT_JITCONFIG is not set" in out

        listing = [
            "stat",
            "-c",
            "%u:%g %a %n",
            "/opt/actions-runner/run.sh",
            "/etc/snapfleet/warmup",
        ]
        code, out = await guest_run(machine, listing, {})
        assert out.splitlines() == [
            "0:0 755 /opt/actions-runner/run.sh",
            "0:0 755 /etc/snapfleet/warmup",
        ]
    finally:
        await machine.destroy()
