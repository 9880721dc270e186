"""Guest images for microVMs: kernel, initramfs and ext4 root disk, cached.

Recipes live in ``<recipes_dir>/<name>/recipe.toml`` (default: the
repository's ``images/``); built images live in a cache directory outside the
checkout. See :func:`build_image`.
"""

from runner.images.build import build_image, find_image
from runner.images.image import Image, load_image_dir

__all__ = ["Image", "build_image", "find_image", "load_image_dir"]
