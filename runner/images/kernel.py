"""Guest kernel layer: a Debian kernel package unpacked into an ELF vmlinux.

microvm boots an uncompressed ELF with a PVH note via ``-kernel vmlinux``;
Debian ships a bzImage, so the LZ4 payload is cut out of it and decompressed.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from runner.errors import ImageError
from runner.images.elf import ELF_MAGIC
from runner.proc import ProgressFn, run

_REAL_KERNEL_RE = re.compile(r"^linux-image-\d[\w.+-]*$")
_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
_LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"
_OTHER_FORMATS = {
    b"\x1f\x8b": "gzip",
    b"\xfd7zXZ": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"BZh": "bzip2",
    b"\x5d\x00\x00": "lzma",
}


@dataclass(frozen=True)
class KernelInfo:
    """What the kernel layer holds, as recorded in ``kernel.json``."""

    package: str
    package_version: str
    version: str

    @property
    def modules_dir(self) -> str:
        """Layer-relative directory holding ``lib/modules/<version>``."""
        return f"modules/{self.version}"


def real_kernel_package(name: str, depends_output: str) -> str:
    """The versioned kernel package behind ``name`` (itself if it is one).

    ``depends_output`` is ``apt-cache depends <name>``; a metapackage such as
    ``linux-image-cloud-amd64`` depends on exactly one real kernel.
    """
    if _REAL_KERNEL_RE.match(name):
        return name
    for line in depends_output.splitlines():
        kind, _, dep = line.strip().partition(":")
        dep = dep.strip()
        if kind.strip() == "Depends" and _REAL_KERNEL_RE.match(dep):
            return dep
    raise ImageError(f"{name} depends on no linux-image-<version> package (is it a kernel?)")


def candidate_version(policy_output: str) -> str:
    """The ``Candidate:`` version from ``apt-cache policy`` output."""
    m = re.search(r"^\s*Candidate:\s*(\S+)", policy_output, re.MULTILINE)
    if not m or m.group(1) == "(none)":
        raise ImageError("apt has no installable candidate; run `apt-get update`?")
    return m.group(1)


def bzimage_payload(bzimage: bytes) -> tuple[bytes, int]:
    """The LZ4 payload of a bzImage and the size it decompresses to.

    Kbuild appends the uncompressed size as 4 little-endian bytes after the
    compressed stream; ``lz4`` reads them as a bogus block and exits 1, so
    they are split off here (and used to check the result).
    """
    if bzimage[0x202:0x206] != b"HdrS":
        raise ImageError("kernel image is not a bzImage (no HdrS setup header)")
    (protocol,) = struct.unpack_from("<H", bzimage, 0x206)
    if protocol < 0x208:
        raise ImageError(f"bzImage boot protocol {protocol:#x} predates payload fields")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if len(payload) != length or length < 8:
        raise ImageError("bzImage payload runs past the end of the file")
    if not payload.startswith((_LZ4_LEGACY_MAGIC, _LZ4_FRAME_MAGIC)):
        fmt = next((n for m, n in _OTHER_FORMATS.items() if payload.startswith(m)), "unknown")
        raise ImageError(f"bzImage payload is {fmt}, only LZ4 is supported")
    (size,) = struct.unpack_from("<I", payload, length - 4)
    return payload[:-4], size


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(4)


async def read_kernel_info(layer: Path) -> KernelInfo:
    """Load ``kernel.json`` of a finished kernel layer."""
    data = json.loads(await asyncio.to_thread((layer / "kernel.json").read_text))
    return KernelInfo(data["package"], data["package_version"], data["version"])


async def build_kernel_layer(package: str, out: Path, progress: ProgressFn) -> KernelInfo:
    """Download ``package``, unpack it and leave vmlinux and modules in ``out``."""
    depends = await run("apt-cache", "depends", package, what=f"apt-cache depends {package}")
    real = real_kernel_package(package, depends.decode())
    policy = await run("apt-cache", "policy", real, what=f"apt-cache policy {real}")
    pkg_version = candidate_version(policy.decode())

    progress(f"downloading kernel {real} {pkg_version}")
    work = out / "work"
    work.mkdir()
    # Root downloads into a root-owned dir; tell apt not to drop to _apt.
    await run(
        "apt-get",
        "download",
        "-o",
        "APT::Sandbox::User=root",
        f"{real}={pkg_version}",
        what=f"apt-get download {real}",
        cwd=work,
    )
    debs = list(work.glob("*.deb"))
    if len(debs) != 1:
        raise ImageError(f"apt-get download {real} left {len(debs)} .deb files")
    tree = work / "tree"
    await run("dpkg-deb", "-x", debs[0], tree, what=f"dpkg-deb -x {debs[0].name}")

    versions = [p.name for p in (tree / "lib/modules").iterdir()]
    if len(versions) != 1:
        raise ImageError(f"{real} ships {len(versions)} module trees, expected one")
    version = versions[0]

    progress(f"unpacking vmlinux {version}")
    bzimage = await asyncio.to_thread((tree / "boot" / f"vmlinuz-{version}").read_bytes)
    payload = work / "payload.lz4"
    compressed, size = bzimage_payload(bzimage)
    await asyncio.to_thread(payload.write_bytes, compressed)
    vmlinux = out / "vmlinux"
    await run("lz4", "-dc", what="lz4 -dc kernel payload", stdin=payload, stdout=vmlinux)
    head = await asyncio.to_thread(_head, vmlinux)
    if head != ELF_MAGIC or vmlinux.stat().st_size != size:
        raise ImageError(f"decompressed {real} payload is not the expected ELF vmlinux")

    info = KernelInfo(real, pkg_version, version)
    (out / "modules").mkdir()
    await asyncio.to_thread(shutil.move, tree / "lib/modules" / version, out / info.modules_dir)
    await asyncio.to_thread(shutil.copy2, tree / "boot" / f"config-{version}", out / "config")
    meta = {
        "package": real,
        "package_version": pkg_version,
        "version": version,
        "requested": package,
    }
    (out / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
    await asyncio.to_thread(shutil.rmtree, work)
    return info
