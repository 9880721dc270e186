"""Guest image builder: recipes, cache keys, layer reuse, and a real boot."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import stat
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from runner.errors import ConfigError, ImageError
from runner.host import host_tsc_khz
from runner.images import build, build_image, find_image, kernel, load_image_dir, rootfs
from runner.images.initramfs import Entry, newc_archive, resolve_modules, with_parents
from runner.images.kernel import bzimage_payload, candidate_version, real_kernel_package
from runner.images.keys import BuildInputs, gather_inputs, layer_keys
from runner.images.recipe import default_recipes_dir, load_recipe, parse_recipe

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
    init = loaded.overlay_dir / "sbin/snapfleet-init"
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
