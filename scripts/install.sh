#!/usr/bin/env bash
# Install what Snapfleet needs on a Debian 12 host: QEMU, qemu-img, nftables,
# the image-building tools, and the Python package in ./.venv.
#   scripts/install.sh          # runtime
#   scripts/install.sh --dev    # plus test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $EUID -ne 0 ]]; then
    echo "install.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi

packages=(qemu-system-x86 qemu-utils nftables iproute2 util-linux debootstrap lz4 cpio
          busybox-static e2fsprogs python3-venv ca-certificates)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "install.sh: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev]"
.venv/bin/python -m pip install -q -e ".${extra}"
echo "install.sh: snapfleet installed in $(pwd)/.venv ($(.venv/bin/snapfleet --version))"
