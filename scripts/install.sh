#!/usr/bin/env bash
# Install what Snapfleet needs on a Debian 12 host: QEMU, qemu-img, nftables,
# the image-building tools, and the Python package in ./.venv.
#   scripts/install.sh                  # runtime
#   scripts/install.sh --dev            # plus test and lint tools
#   scripts/install.sh --systemd        # plus the snapfleet.service unit (not started)
# With --systemd, DESTDIR=/some/root puts the unit, config and links under
# that root instead of / (for packaging; systemctl is not called then).
set -euo pipefail
cd "$(dirname "$0")/.."

dev=false
systemd=false
for arg in "$@"; do
    case "$arg" in
        --dev) dev=true ;;
        --systemd) systemd=true ;;
        *) echo "install.sh: unknown option $arg (use --dev, --systemd)" >&2; exit 2 ;;
    esac
done

if [[ $EUID -ne 0 ]]; then
    echo "install.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi

# The unit, tmpfiles.d and sysusers.d files, the /usr/local/bin/snapfleet link
# the unit's ExecStart uses, and a config to edit. Starting is left to the
# operator: `systemctl enable --now snapfleet` after checking the config.
install_systemd() {
    local dest=${DESTDIR:-}
    local checkout
    checkout=$(pwd)
    install -D -m 0644 systemd/snapfleet.service "$dest/etc/systemd/system/snapfleet.service"
    install -D -m 0644 systemd/snapfleet.tmpfiles "$dest/etc/tmpfiles.d/snapfleet.conf"
    install -D -m 0644 systemd/snapfleet.sysusers "$dest/etc/sysusers.d/snapfleet.conf"
    install -D -m 0644 systemd/snapfleet-cache-gc.service \
        "$dest/etc/systemd/system/snapfleet-cache-gc.service"
    install -D -m 0644 systemd/snapfleet-cache-gc.timer \
        "$dest/etc/systemd/system/snapfleet-cache-gc.timer"
    # The group first: the tmpfiles entries name it.
    systemd-sysusers --root="${dest:-/}" "$dest/etc/sysusers.d/snapfleet.conf"
    systemd-tmpfiles --root="${dest:-/}" --create "$dest/etc/tmpfiles.d/snapfleet.conf"

    install -d -m 0755 "$dest/usr/local/bin"
    ln -sfn "$checkout/.venv/bin/snapfleet" "$dest/usr/local/bin/snapfleet"

    local config="$dest/etc/snapfleet/config.toml"
    if [[ ! -e "$config" ]]; then
        local gid
        gid=$(awk -F: '$1 == "snapfleet" { print $3 }' "$dest/etc/group")
        # Readable by the API group too, so `snapfleet --config ... submit` works for them.
        install -m 0640 -o root -g "$gid" config.example.toml "$config"
        echo "install.sh: wrote $config (edit it, then: snapfleet config check $config)"
    fi

    # ProtectHome=yes hides /home and /root from the service, and with them a
    # checkout (and its .venv) living there.
    local dropin="$dest/etc/systemd/system/snapfleet.service.d/checkout-in-home.conf"
    if [[ "$checkout" == /home/* || "$checkout" == /root || "$checkout" == /root/* ]]; then
        install -D -m 0644 /dev/stdin "$dropin" <<CONF
# Written by scripts/install.sh: the checkout is $checkout.
[Service]
ProtectHome=read-only
CONF
        echo "install.sh: the checkout is under /home or /root; the unit gets ProtectHome=read-only"
    else
        rm -f "$dropin"
    fi

    # /run/systemd/system exists only when systemd is PID 1 (sd_booted(3));
    # in containers and chroots there is no manager to reload.
    if [[ -z "$dest" && -d /run/systemd/system ]]; then
        systemctl daemon-reload
        echo "install.sh: unit installed; start it with: systemctl enable --now snapfleet"
    else
        echo "install.sh: unit installed under ${dest:-/}; systemd is not running here, not reloaded"
    fi
}

packages=(qemu-system-x86 qemu-utils nftables iproute2 util-linux debootstrap lz4 cpio
          busybox-static e2fsprogs python3-venv ca-certificates systemd)
# The isolation tests serve DNS to guests from a fake "outside" namespace.
$dev && packages+=(dnsmasq-base)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "install.sh: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# QEMU drops to this user once it has opened its files (vm.run_as).
if ! id snapfleet-vmm >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        --user-group snapfleet-vmm
    echo "install.sh: created system user snapfleet-vmm (QEMU runs as it)"
fi

python=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extra=""
$dev && extra="[dev]"
.venv/bin/python -m pip install -q -e ".${extra}"
echo "install.sh: snapfleet installed in $(pwd)/.venv ($(.venv/bin/snapfleet --version))"

$systemd && install_systemd
exit 0
