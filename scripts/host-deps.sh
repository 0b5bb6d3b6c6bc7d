#!/bin/bash
# Install what building and testing nvme-dataplane needs from Debian's archive.
#
# Idempotent and quiet when nothing is missing.  On a Debian bookworm host it
# adds, once, and says so:
#   /etc/apt/sources.list.d/nvme-dataplane.sources
#       bookworm-backports (deb)   for meson >= 1.5 (QEMU 10.0 needs it)
#       trixie (deb-src only)      for 'apt-get source qemu/trixie'
#   /etc/apt/preferences.d/nvme-dataplane
#       backports and trixie pinned at priority 1: nothing is upgraded from
#       them unless asked for by name (-t bookworm-backports).
set -euo pipefail

SOURCES=/etc/apt/sources.list.d/nvme-dataplane.sources
PREFS=/etc/apt/preferences.d/nvme-dataplane

DEPS=(
    build-essential pkg-config git ca-certificates dpkg-dev
    libglib2.0-dev libpixman-1-dev zlib1g-dev libaio-dev liburing-dev
    libslirp-dev libfdt-dev flex bison ninja-build python3-venv
    ccache seabios ipxe-qemu
    # guest image and benchmark harness
    cpio gzip python3 gnuplot-nox
    # the cost meter (make cost)
    valgrind strace
)

log() { echo "host-deps: $*"; }

if [ "$(id -u)" != 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

need_update=0
. /etc/os-release
if [ "${VERSION_CODENAME:-}" = bookworm ]; then
    if [ ! -f "$SOURCES" ]; then
        log "adding $SOURCES (bookworm-backports deb, trixie deb-src)"
        $SUDO tee "$SOURCES" >/dev/null <<EOS
# Added by nvme-dataplane scripts/host-deps.sh
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
        need_update=1
    fi
    if [ ! -f "$PREFS" ]; then
        log "adding $PREFS (backports and trixie pinned at priority 1)"
        $SUDO tee "$PREFS" >/dev/null <<EOS
# Added by nvme-dataplane scripts/host-deps.sh: never upgrade from these
# unless a package is asked for by name with -t.
Package: *
Pin: release n=bookworm-backports
Pin-Priority: 1

Package: *
Pin: release n=trixie
Pin-Priority: 1
EOS
    fi
else
    log "not bookworm (${VERSION_CODENAME:-unknown}): not touching apt sources"
fi

missing=()
for p in "${DEPS[@]}"; do
    if ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed'; then
        missing+=("$p")
    fi
done

meson_ok() {
    command -v meson >/dev/null &&
        dpkg --compare-versions "$(meson --version 2>/dev/null || echo 0)" ge 1.5
}

apt_update() {
    if [ "$need_update" = 1 ] || [ ! -d /var/lib/apt/lists ] ||
       [ -z "$(ls /var/lib/apt/lists/ 2>/dev/null | grep -e bookworm-backports -e _trixie_)" ]; then
        log "apt-get update"
        $SUDO apt-get update -qq >/dev/null
        need_update=0
    fi
}

if [ ${#missing[@]} -gt 0 ]; then
    apt_update
    log "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

if ! meson_ok; then
    apt_update
    log "installing meson and python3-pycotap from bookworm-backports"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        -t bookworm-backports meson >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        -t bookworm-backports python3-pycotap >/dev/null 2>&1 ||
        log "python3-pycotap not available (Debian's patches do not need it)"
fi
meson_ok || { log "meson >= 1.5 is required, found $(meson --version 2>/dev/null || echo none)"; exit 1; }

# Make sure the trixie deb-src index is present for 'apt-get source'.
apt_update
