"""Whether a profile's guest can serve gitlab-runner's custom executor.

The stage scripts gitlab-runner generates call its own binary inside the VM
for artifacts and caches (``gitlab-runner artifacts-uploader``,
``cache-extractor``...). An image without it fails any job with ``artifacts:``
late and obscurely, so `snapfleet gitlab-executor config` asks the daemon
first and fails the job at once with what to do. Which recipes carry the helper
is `runner.images.recipe.has_gitlab_runner`; this module finds a profile's
recipe (a recipe name, or the recipe recorded in a built image directory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from runner.config import Settings
from runner.errors import ConfigError
from runner.images.image import MANIFEST
from runner.images.recipe import GITLAB_RUNNER_PATHS, Recipe, has_gitlab_runner, load_recipe

RECIPE = "gitlab-runner"
"""The shipped recipe that adds the helper (`images/gitlab-runner/recipe.toml`)."""


@dataclass(frozen=True)
class ImageCheck:
    """A profile's image, and why it cannot run custom-executor jobs (None: it can,
    or it cannot be told)."""

    image: str | None
    problem: str | None = None


def check_image(settings: Settings, profile: str) -> ImageCheck:
    """Whether ``profile``'s image has the gitlab-runner helper (blocking: reads its
    recipe). No problem when ``[gitlab] require_helper`` is off, for an unknown
    profile (the caller says it is not allowed), or for an image whose recipe is
    not known (the profile's own rootfs, a directory built elsewhere)."""
    found = settings.profiles.get(profile)
    if found is None:
        return ImageCheck(None)
    if found.rootfs is not None:
        return ImageCheck(str(found.rootfs))
    image = found.image
    if not settings.gitlab.require_helper:
        return ImageCheck(image)
    try:
        recipe = _recipe_of(image, settings.paths.recipes_dir)
    except ConfigError as exc:
        return ImageCheck(image, f"profile {profile!r}: image {image!r}: {exc}")
    if recipe is None or has_gitlab_runner(recipe):
        return ImageCheck(image)
    return ImageCheck(image, missing_helper(profile, image))


def missing_helper(profile: str, image: str) -> str:
    """The one line that says what is missing and the two ways out."""
    return (
        f"profile {profile!r} runs image {image!r}, which has no gitlab-runner helper"
        f" ({' or '.join(GITLAB_RUNNER_PATHS)}) for gitlab-runner's artifact and cache"
        f" commands: build the {RECIPE!r} image"
        f" (SNAPFLEET_GITLAB_RUNNER_BINARY=/path/to/gitlab-runner-linux-amd64 snapfleet"
        f' image build {RECIPE}) and set image = "{RECIPE}" in [profiles.{profile}],'
        f" or, if no job uses artifacts or caches, set [gitlab] require_helper = false"
    )


def _recipe_of(image: str, recipes_dir: Path | None) -> Recipe | None:
    """The recipe ``image`` is built from; None for a directory that records none."""
    candidate = Path(image)
    if not (candidate.is_absolute() or candidate.is_dir()):
        return load_recipe(image, recipes_dir).recipe
    try:
        recorded = json.loads((candidate / MANIFEST).read_text()).get("recipe")
        return None if recorded is None else Recipe.model_validate(recorded)
    except (OSError, ValueError, AttributeError, ValidationError):
        return None  # a hand-made image: its contents cannot be told from here
