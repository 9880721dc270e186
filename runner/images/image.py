"""A built guest image on disk and its ``manifest.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import ImageError
from runner.images.cache import sha256_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Manifest "files" role -> conventional file name in an image directory.
ROLES = ("kernel", "initramfs", "rootfs")
# The recipe's ``warmup`` as a script in the guest: the snapshot template runs
# it before saving, so its effect (files in the page cache) is in every clone.
WARMUP_GUEST_PATH = "/etc/snapfleet/warmup"


@dataclass(frozen=True)
class Image:
    """A bootable guest: kernel, initramfs, root disk and the command line to use.

    ``cmdline`` is the base kernel command line; the VMM appends its own
    parameters (e.g. ``snapfleet.ip=``). ``rootfs`` is the pristine disk:
    boot a copy or a copy-on-write overlay, never the file itself.
    ``warmup`` is the recipe's warm-up script (installed in the guest at
    `WARMUP_GUEST_PATH`), or None.
    """

    name: str
    digest: str
    path: Path
    kernel: Path
    initramfs: Path
    rootfs: Path
    cmdline: str
    manifest: dict[str, Any]
    warmup: str | None = None


def file_record(path: Path) -> dict[str, Any]:
    """Manifest entry for one artifact (hashes the file: call via a thread)."""
    return {"file": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` last, after every file it describes."""
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def load_image_dir(path: Path, *, verify: bool = False) -> Image:
    """Load an image directory (built here or supplied by the user).

    The directory needs a ``manifest.json`` naming the kernel, initramfs and
    rootfs files with their sizes. Sizes are always checked; ``verify=True``
    also re-hashes every file against its sha256 (slow for a large rootfs).
    """
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as exc:
        raise ImageError(f"{path} is not an image directory: no {MANIFEST}") from exc
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot read {manifest_path}: {exc}") from exc
    try:
        files = {role: manifest["files"][role] for role in ROLES}
        name, digest, cmdline = manifest["name"], manifest["digest"], manifest["cmdline"]
    except (KeyError, TypeError) as exc:
        raise ImageError(f"{manifest_path} lacks {exc}") from exc
    warmup = manifest.get("warmup")  # absent in manifests made before warm-ups
    if warmup is not None and not isinstance(warmup, str):
        raise ImageError(f"{manifest_path}: warmup must be a string")
    paths = {role: path / str(rec["file"]) for role, rec in files.items()}
    for role, file in paths.items():
        rec = files[role]
        if not file.is_file():
            raise ImageError(f"image {path}: {role} file {file.name} is missing")
        if file.stat().st_size != rec.get("size"):
            raise ImageError(f"image {path}: {file.name} has the wrong size; rebuild it")
        if verify and sha256_file(file) != rec.get("sha256"):
            raise ImageError(f"image {path}: {file.name} does not match its sha256; rebuild it")
    return Image(
        name=str(name),
        digest=str(digest),
        path=path,
        kernel=paths["kernel"],
        initramfs=paths["initramfs"],
        rootfs=paths["rootfs"],
        cmdline=str(cmdline),
        manifest=manifest,
        warmup=warmup,
    )
