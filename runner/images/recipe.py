"""Image recipes: ``<recipes_dir>/<name>/recipe.toml``, validated once."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

import runner
from runner.errors import ConfigError

RECIPE_FILE = "recipe.toml"
DEFAULT_CMDLINE = (
    "console=ttyS0 root=/dev/vda rw rootfstype=ext4 init=/sbin/snapfleet-init panic=-1"
)
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")

PackageName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9+.-]+$")]
ModuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]+$")]
RelPath = Annotated[str, StringConstraints(pattern=r"^[^/].*$", min_length=1)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]

ENV_PREFIX = "env:"
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
URL_SCHEMES = ("http://", "https://", "file://")


class Archive(BaseModel):
    """A file from the operator put into the guest tree at ``dest``.

    With ``format = "tar"`` (the default) it is a tar archive (.tar, .tar.gz,
    .tgz) unpacked into the directory ``dest``; with ``format = "file"`` it is a
    single executable copied to the path ``dest`` (root-owned, mode 0755), e.g.
    a vendor's static binary.

    ``source`` is a local path (relative to the recipe dir, or absolute), an
    http(s):// or file:// URL, or ``env:NAME``: the path or URL is read from
    environment variable NAME at build time, so an operator can supply a
    file the recipe cannot name (a vendor tarball of a given version).
    ``hint`` tells the operator what to provide when it is missing.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Annotated[str, StringConstraints(pattern=r"^\S", min_length=1)]
    dest: Annotated[str, StringConstraints(pattern=r"^/[^\x00]*$")]
    sha256: Sha256 | None = None
    hint: str | None = None
    format: Literal["tar", "file"] = "tar"

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value.startswith(ENV_PREFIX):
            if not _ENV_NAME_RE.match(value[len(ENV_PREFIX) :]):
                raise ValueError("env: must be followed by an environment variable name")
        elif "://" in value and not value.startswith(URL_SCHEMES):
            raise ValueError(f"URL scheme must be one of {', '.join(URL_SCHEMES)}")
        return value

    @field_validator("dest")
    @classmethod
    def _plain_guest_path(cls, value: str) -> str:
        parts = value.split("/")[1:]
        if value == "/" or any(p in ("", ".", "..") for p in parts):
            raise ValueError("must be an absolute guest path below / without '.', '..' or '//'")
        return value


class Recipe(BaseModel):
    """What goes into a guest image. Relative paths are relative to the recipe dir."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]*$")] = "bookworm"
    mirror: Annotated[str, StringConstraints(pattern=r"^(https?|file)://\S+$")]
    variant: Literal["minbase", "buildd", "fakechroot"] = "minbase"
    components: tuple[PackageName, ...] = ("main",)
    packages: tuple[PackageName, ...] = ()
    kernel_package: Annotated[str, StringConstraints(pattern=r"^linux-image-[a-z0-9+.-]+$")]
    modules: tuple[ModuleName, ...] = ()
    rootfs_size_mib: int = Field(2048, ge=256, le=1 << 20)
    cmdline: Annotated[str, StringConstraints(pattern=r"^[^\n]+$")] = DEFAULT_CMDLINE
    busybox: Path = Path("/bin/busybox")
    initramfs_init: RelPath = "initramfs-init"
    # One overlay dir or several, copied in order (a later one wins), e.g.
    # ["../default/rootfs", "rootfs"] to build on the default guest's files.
    overlay: RelPath | tuple[RelPath, ...] = "rootfs"
    # Unpacked, in order, after the debootstrap tree and before the overlays.
    archives: tuple[Archive, ...] = ()
    # A shell script the snapshot template runs before it is saved (e.g. read
    # a large program's files so every clone has them in its page cache).
    warmup: Annotated[str, StringConstraints(pattern=r"\S")] | None = None
    # Directory holding the ``runner`` package whose agent goes into the
    # guest; default: the package this builder is part of.
    agent_source: Path | None = None


GITLAB_RUNNER = "gitlab-runner"
GITLAB_RUNNER_PATHS = ("/usr/local/bin/gitlab-runner", "/usr/bin/gitlab-runner")
"""Where gitlab-runner's stage scripts find their helper on the guest's PATH."""


def has_gitlab_runner(recipe: Recipe) -> bool:
    """Whether images from ``recipe`` carry the ``gitlab-runner`` helper that the custom
    executor's stage scripts call (``artifacts-uploader``, ``cache-extractor``...): a
    single-file archive installed on PATH, or a Debian package of that name (pure)."""
    return GITLAB_RUNNER in recipe.packages or any(
        a.format == "file" and a.dest in GITLAB_RUNNER_PATHS for a in recipe.archives
    )


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe plus where it came from."""

    name: str
    directory: Path
    recipe: Recipe

    @property
    def init_path(self) -> Path:
        """The initramfs ``/init`` script."""
        return self.directory / self.recipe.initramfs_init

    @property
    def overlay_dirs(self) -> tuple[Path, ...]:
        """Trees copied over the debootstrap tree, at the same guest paths, in order."""
        overlay = self.recipe.overlay
        names = (overlay,) if isinstance(overlay, str) else overlay
        return tuple(self.directory / name for name in names)

    @property
    def agent_root(self) -> Path:
        """The directory that contains the ``runner`` package to install."""
        src = self.recipe.agent_source
        if src is None:
            return Path(runner.__file__).resolve().parents[1]
        return src if src.is_absolute() else self.directory / src


def default_recipes_dir() -> Path:
    """The repository's ``images/`` directory."""
    return Path(runner.__file__).resolve().parents[1] / "images"


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "recipe"


def parse_recipe(data: Mapping[str, object], *, source: str) -> Recipe:
    """Validate recipe data; raise ``ConfigError`` naming the first bad field."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        reason = f"{first['msg']} (in {source})"
        if len(errors) > 1:
            more = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in errors[1:])
            reason += f"; also {more}"
        raise ConfigError(_loc(first["loc"]), reason) from exc


def load_recipe(name: str, recipes_dir: Path | None = None) -> LoadedRecipe:
    """Find recipe ``name`` under ``recipes_dir`` and validate it and its files."""
    base = recipes_dir if recipes_dir is not None else default_recipes_dir()
    if not _NAME_RE.match(name):
        raise ConfigError("image", f"invalid image name {name!r}")
    path = base / name / RECIPE_FILE
    if not path.is_file():
        have = sorted(p.parent.name for p in base.glob(f"*/{RECIPE_FILE}"))
        raise ConfigError(
            "image", f"no recipe {name!r} in {base} (available: {', '.join(have) or 'none'})"
        )
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from exc
    loaded = LoadedRecipe(name, path.parent, parse_recipe(data, source=str(path)))
    if not loaded.init_path.is_file():
        raise ConfigError("initramfs_init", f"{loaded.init_path} does not exist")
    for overlay in loaded.overlay_dirs:
        if not overlay.is_dir():
            raise ConfigError("overlay", f"{overlay} is not a directory")
    if not (loaded.agent_root / "runner" / "__init__.py").is_file():
        raise ConfigError("agent_source", f"{loaded.agent_root} holds no runner package")
    return loaded
