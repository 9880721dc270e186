"""Cache keys: which inputs each layer depends on (pure, plus one gatherer)."""

from __future__ import annotations

import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import ConfigError
from runner.images.archives import ResolvedArchive
from runner.images.cache import digest, sha256_bytes
from runner.images.image import WARMUP_GUEST_PATH
from runner.images.recipe import LoadedRecipe, Recipe

# Bump a layer's format when the code that builds it changes its output.
KERNEL_FORMAT = 1
BASE_FORMAT = 1
INITRAMFS_FORMAT = 1
IMAGE_FORMAT = 1

AGENT_PREFIX = "opt/snapfleet"


@dataclass(frozen=True)
class BuildInputs:
    """Everything an image is made from, read into memory."""

    name: str
    recipe: Recipe
    init_script: bytes
    busybox_sha256: str
    # Guest path (relative to /) -> (permission bits, content).
    files: Mapping[str, tuple[int, bytes]]
    # Unpacked in order before ``files``; only their dest and sha256 are keyed.
    archives: tuple[ResolvedArchive, ...] = ()


@dataclass(frozen=True)
class LayerKeys:
    """Full sha256 keys of each layer."""

    kernel: str
    rootfs_base: str
    initramfs: str
    image: str


def recipe_digest(recipe: Recipe) -> str:
    """Digest of the validated recipe alone."""
    return digest(recipe.model_dump(mode="json"))


def layer_keys(inputs: BuildInputs) -> LayerKeys:
    """Derive each layer's key from exactly the inputs that change its bytes."""
    r = inputs.recipe
    kernel = digest({"layer": "kernel", "format": KERNEL_FORMAT, "package": r.kernel_package})
    base = digest(
        {
            "layer": "rootfs-base",
            "format": BASE_FORMAT,
            "suite": r.suite,
            "mirror": r.mirror,
            "variant": r.variant,
            "components": list(r.components),
            "packages": sorted(set(r.packages)),
        }
    )
    initramfs = digest(
        {
            "layer": "initramfs",
            "format": INITRAMFS_FORMAT,
            "kernel": kernel,
            "init": sha256_bytes(inputs.init_script),
            "modules": list(r.modules),
            "busybox": inputs.busybox_sha256,
        }
    )
    image_inputs: dict[str, Any] = {
        "layer": "image",
        "format": IMAGE_FORMAT,
        "name": inputs.name,
        "kernel": kernel,
        "rootfs_base": base,
        "initramfs": initramfs,
        "rootfs_size_mib": r.rootfs_size_mib,
        "cmdline": r.cmdline,
        "files": {p: [m, sha256_bytes(d)] for p, (m, d) in sorted(inputs.files.items())},
    }
    if inputs.archives:
        # Content, not path: a new tarball rebuilds, the same one moved does not.
        # (Absent when empty, so images without archives keep their keys; the
        # format only for single files, so tarball-only images keep theirs too.)
        image_inputs["archives"] = [
            [a.dest, a.sha256] if a.format == "tar" else [a.dest, a.sha256, a.format]
            for a in inputs.archives
        ]
    return LayerKeys(kernel, base, initramfs, digest(image_inputs))


def _tree_files(root: Path, pattern: str, dest: str) -> dict[str, tuple[int, bytes]]:
    files = {}
    for path in sorted(root.glob(pattern)):
        if "__pycache__" in path.parts or path.is_symlink() or not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        # Only the executable bit survives git; keep modes independent of umask.
        mode = 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644
        files[f"{dest}/{rel}".lstrip("/")] = (mode, path.read_bytes())
    return files


def gather_inputs(loaded: LoadedRecipe, archives: Sequence[ResolvedArchive] = ()) -> BuildInputs:
    """Read the init script, busybox, overlays and agent source (blocking I/O).

    ``archives`` are the recipe's archives as `runner.images.archives`
    located or fetched them.
    """
    r = loaded.recipe
    try:
        busybox = r.busybox.read_bytes()
    except OSError as exc:
        raise ConfigError("busybox", f"cannot read {r.busybox}: {exc}") from exc
    files: dict[str, tuple[int, bytes]] = {}
    for overlay in loaded.overlay_dirs:
        files |= _tree_files(overlay, "**/*", "")
    if r.warmup is not None:
        # The template runs the guest's copy, so the script travels with the image.
        files[WARMUP_GUEST_PATH.lstrip("/")] = (0o755, f"#!/bin/sh\n{r.warmup}\n".encode())
    # Only the stdlib-only guest side of the package goes in: runner/__init__.py
    # and runner/agent/, never the host-side modules.
    agent_root = loaded.agent_root
    files |= _tree_files(agent_root, "runner/__init__.py", AGENT_PREFIX)
    files |= _tree_files(agent_root, "runner/agent/**/*.py", AGENT_PREFIX)
    return BuildInputs(
        name=loaded.name,
        recipe=r,
        init_script=loaded.init_path.read_bytes(),
        busybox_sha256=sha256_bytes(busybox),
        files=files,
        archives=tuple(archives),
    )
