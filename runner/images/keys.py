"""Cache keys: which inputs each layer depends on (pure, plus one gatherer)."""

from __future__ import annotations

import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from runner.errors import ConfigError
from runner.images.cache import digest, sha256_bytes
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
    image = digest(
        {
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
    )
    return LayerKeys(kernel, base, initramfs, image)


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


def gather_inputs(loaded: LoadedRecipe) -> BuildInputs:
    """Read the init script, busybox, overlay and agent source (blocking I/O)."""
    r = loaded.recipe
    try:
        busybox = r.busybox.read_bytes()
    except OSError as exc:
        raise ConfigError("busybox", f"cannot read {r.busybox}: {exc}") from exc
    files = _tree_files(loaded.overlay_dir, "**/*", "")
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
    )
