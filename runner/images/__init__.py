"""Guest images for microVMs: kernel, initramfs and ext4 root disk, cached.

Recipes live in ``<recipes_dir>/<name>/recipe.toml`` (default: the
repository's ``images/``); built images live in a cache directory outside the
checkout. See :func:`build_image`. A recipe may unpack archives into the
guest (``[[archives]]``, see `runner.images.recipe.Archive`) and name a
``warmup`` script the snapshot template runs (`WARMUP_GUEST_PATH`).
"""

from runner.images.build import build_image, find_image
from runner.images.image import WARMUP_GUEST_PATH, Image, load_image_dir

__all__ = ["WARMUP_GUEST_PATH", "Image", "build_image", "find_image", "load_image_dir"]
