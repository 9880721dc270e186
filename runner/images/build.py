"""Build guest images from recipes, layer by layer, through the cache."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runner.images import archives, cache, kernel, keys, rootfs
from runner.images.image import MANIFEST, MANIFEST_FORMAT, Image, file_record, load_image_dir
from runner.images.image import write_manifest as _write_manifest
from runner.images.initramfs import INITRAMFS_FILE, build_initramfs_layer
from runner.images.recipe import LoadedRecipe, load_recipe
from runner.proc import ProgressFn

VMLINUX = "vmlinux"


def _noop(_message: str) -> None:
    pass


def find_image(
    name: str,
    *,
    cache_dir: Path,
    recipes_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Image | None:
    """The cached image built from the *current* recipe ``name``, or None.

    Reads the recipe and its inputs to compute the key (cheap; an archive is
    hashed once per process) and checks the manifest and file sizes of
    ``image-<key>``; never builds or downloads anything. ``environ`` (default
    ``os.environ``) supplies ``env:NAME`` archive sources.
    """
    loaded = load_recipe(name, recipes_dir)
    found = archives.locate(loaded, cache_dir, os.environ if environ is None else environ)
    if found is None:
        return None  # an archive URL is not downloaded yet, so this image was never built
    path = cache.layer_path(
        cache_dir, "image", keys.layer_keys(keys.gather_inputs(loaded, found)).image
    )
    if not (path / MANIFEST).is_file():
        return None
    return load_image_dir(path)


async def build_image(
    name: str,
    *,
    cache_dir: Path,
    recipes_dir: Path | None = None,
    progress: ProgressFn = _noop,
    force: bool = False,
    verify: bool = False,
    environ: Mapping[str, str] | None = None,
) -> Image:
    """Build image ``name`` (or return it from the cache) and return it.

    Layers whose inputs are unchanged are reused, so editing the agent or the
    guest files only re-makes the ext4 image. ``force`` rebuilds every layer;
    ``verify`` re-hashes a cached image's files. Raises ``ConfigError`` for a
    bad recipe, ``HostError`` for a missing tool and ``ImageError`` when a
    step fails; no partial layer is left behind. ``environ`` (default
    ``os.environ``) supplies ``env:NAME`` archive sources; archive URLs are
    downloaded into ``cache_dir``.
    """
    # Every layer and download used is share-locked until the build ends, so
    # `snapfleet cache gc` never takes one away from under it.
    with cache.Holds() as holds:
        return await _build(
            name, cache_dir, recipes_dir, progress, force, verify, environ, holds
        )


async def _build(
    name: str,
    cache_dir: Path,
    recipes_dir: Path | None,
    progress: ProgressFn,
    force: bool,
    verify: bool,
    environ: Mapping[str, str] | None,
    holds: cache.Holds,
) -> Image:
    loaded = load_recipe(name, recipes_dir)
    env = os.environ if environ is None else environ
    fetched = await archives.fetch(loaded, cache_dir, env, progress)
    for archive in fetched:
        holds.take(archive.path)
    inputs = await asyncio.to_thread(keys.gather_inputs, loaded, fetched)
    k = keys.layer_keys(inputs)
    final = cache.layer_path(cache_dir, "image", k.image)
    if not force and (final / MANIFEST).is_file() and holds.take(final):
        progress(f"image {name} is cached at {final}")
        return await asyncio.to_thread(load_image_dir, final, verify=verify)

    started = time.monotonic()
    await asyncio.to_thread(cache.remove_stale_temps, cache_dir)
    kdir = await _layer(
        cache_dir,
        "kernel",
        k.kernel,
        force,
        holds,
        progress,
        lambda out: kernel.build_kernel_layer(loaded.recipe.kernel_package, out, progress),
    )
    kinfo = await kernel.read_kernel_info(kdir)
    base = await _layer(
        cache_dir,
        "rootfs-base",
        k.rootfs_base,
        force,
        holds,
        progress,
        lambda out: _base(loaded, out, progress),
    )
    r = loaded.recipe
    idir = await _layer(
        cache_dir,
        "initramfs",
        k.initramfs,
        force,
        holds,
        progress,
        lambda out: build_initramfs_layer(
            kdir, kinfo, inputs.init_script, r.modules, r.busybox, out, progress
        ),
    )

    files = dict(inputs.files)
    stamp = {"name": name, "digest": k.image}
    files["etc/snapfleet/image.json"] = (0o644, (json.dumps(stamp) + "\n").encode())
    async with cache.building(cache_dir, "image", k.image) as out:
        await asyncio.to_thread(_link_or_copy, kdir / VMLINUX, out / VMLINUX)
        await asyncio.to_thread(_link_or_copy, idir / INITRAMFS_FILE, out / INITRAMFS_FILE)
        work = out / ".work"
        work.mkdir()
        await rootfs.build_rootfs_image(
            base_layer=base,
            files=files,
            archives=inputs.archives,
            size_mib=r.rootfs_size_mib,
            out=out,
            work=work,
            progress=progress,
        )
        work.rmdir()
        progress("hashing artifacts")
        manifest = await _manifest(
            loaded, inputs, k, kinfo, base, idir, out, time.monotonic() - started
        )
        await asyncio.to_thread(_write_manifest, out, manifest)
    progress(f"image {name} built at {final} in {time.monotonic() - started:.0f}s")
    return await asyncio.to_thread(load_image_dir, final)


async def _layer(
    cache_dir: Path,
    layer: str,
    key: str,
    force: bool,
    holds: cache.Holds,
    progress: ProgressFn,
    make: Callable[[Path], Awaitable[object]],
) -> Path:
    """Return ``<layer>-<key>`` (held), building it with ``make(tmpdir)`` if absent."""
    path = cache.layer_path(cache_dir, layer, key)
    if path.is_dir() and not force and holds.take(path):
        progress(f"using cached {path.name}")
        return path
    async with cache.building(cache_dir, layer, key) as out:
        await make(out)
    holds.take(path)
    return path


async def _base(loaded: LoadedRecipe, out: Path, progress: ProgressFn) -> None:
    r = loaded.recipe
    await rootfs.build_base_layer(
        suite=r.suite,
        mirror=r.mirror,
        variant=r.variant,
        components=r.components,
        packages=r.packages,
        out=out,
        progress=progress,
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link shares the bytes with the layer and survives its deletion.
    try:
        os.link(src, dst)
    except OSError:
        dst.write_bytes(src.read_bytes())


async def _manifest(
    loaded: LoadedRecipe,
    inputs: keys.BuildInputs,
    k: keys.LayerKeys,
    kinfo: kernel.KernelInfo,
    base: Path,
    idir: Path,
    out: Path,
    seconds: float,
) -> dict[str, Any]:
    r = loaded.recipe
    records = await asyncio.gather(
        *(
            asyncio.to_thread(file_record, out / f)
            for f in (VMLINUX, INITRAMFS_FILE, rootfs.ROOTFS_FILE)
        )
    )
    packages = rootfs.read_packages(
        await asyncio.to_thread((base / rootfs.PACKAGES_FILE).read_text)
    )
    modules = json.loads(await asyncio.to_thread((idir / "initramfs.json").read_text))["modules"]
    return {
        "format": MANIFEST_FORMAT,
        "name": loaded.name,
        "digest": k.image,
        "recipe_digest": keys.recipe_digest(r),
        "recipe": r.model_dump(mode="json"),
        "cmdline": r.cmdline,
        "warmup": r.warmup,
        "files": dict(zip(("kernel", "initramfs", "rootfs"), records, strict=True)),
        "kernel": {
            "package": kinfo.package,
            "package_version": kinfo.package_version,
            "version": kinfo.version,
            "requested": r.kernel_package,
        },
        "initramfs": {"modules": modules},
        "rootfs": {
            "suite": r.suite,
            "mirror": r.mirror,
            "size_mib": r.rootfs_size_mib,
            "packages": packages,
            "guest_files": sorted(inputs.files),
            "archives": [
                {"source": a.source, "file": a.path.name, "dest": a.dest, "sha256": a.sha256}
                | ({"format": a.format} if a.format != "tar" else {})
                for a in inputs.archives
            ],
        },
        "layers": {
            "kernel": cache.layer_path(out.parent, "kernel", k.kernel).name,
            "rootfs_base": base.name,
            "initramfs": idir.name,
        },
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_seconds": round(seconds, 1),
    }
