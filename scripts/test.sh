#!/usr/bin/env bash
# Install everything (including test tools), lint, type-check and run the whole
# test suite, real microVMs included. Built images and snapshots are cached in
# $SNAPFLEET_CACHE_DIR (default /var/cache/snapfleet), outside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --dev
.venv/bin/ruff check runner tests bench
.venv/bin/mypy
exec .venv/bin/pytest -p no:cacheprovider "$@"
