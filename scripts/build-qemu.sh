#!/bin/bash
# Configure (once, or when the options change) and build QEMU in TREE/build.
#
#   scripts/build-qemu.sh TREE [ninja targets...]
#
# Environment: QEMU_BUILD_DIR (default TREE/build), QEMU_CC/QEMU_CXX (default
# gcc/g++), QEMU_CONFIGURE_EXTRA (more configure options).  ccache is used
# when present.
set -euo pipefail
tree=$(cd "$1" && pwd); shift
bdir=${QEMU_BUILD_DIR:-$tree/build}

opts=(
    --target-list=x86_64-softmmu
    --enable-kvm --enable-tcg
    --enable-linux-aio --enable-linux-io-uring --enable-slirp
    --disable-download --disable-install-blobs --disable-docs
    --disable-werror
    --python=/usr/bin/python3
    --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu
)
cc=${QEMU_CC:-gcc}
cxx=${QEMU_CXX:-g++}
if [ -x "/usr/lib/ccache/$cc" ]; then
    cc=/usr/lib/ccache/$cc
    [ ! -x "/usr/lib/ccache/$cxx" ] || cxx=/usr/lib/ccache/$cxx
    export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$(dirname "$tree")}
    export CCACHE_NOHASHDIR=1
fi
opts+=(--cc="$cc" --cxx="$cxx" --host-cc="$cc")
# shellcheck disable=SC2206
opts+=(${QEMU_CONFIGURE_EXTRA:-})

want="${opts[*]}"
if [ ! -f "$bdir/build.ninja" ] || [ "$(cat "$bdir/.nvme-dataplane-configure" 2>/dev/null)" != "$want" ]; then
    echo "build-qemu: configuring ${bdir#"$(dirname "$tree")"/}: $want"
    rm -rf "$bdir"
    mkdir -p "$bdir"
    (cd "$bdir" && "$tree/configure" "${opts[@]}" >configure.log 2>&1) || {
        tail -40 "$bdir/configure.log" >&2
        echo "build-qemu: configure failed, see $bdir/configure.log" >&2
        exit 1
    }
    echo "$want" >"$bdir/.nvme-dataplane-configure"
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(qemu-system-x86_64 qemu-img)
echo "build-qemu: ninja ${targets[*]}"
# (the status of ninja, not of the filter: PIPESTATUS right after the pipe)
ninja -C "$bdir" -j"$(nproc)" "${targets[@]}" | { grep -v -e '^\[[0-9]*/[0-9]*\] ' || true; }
test "${PIPESTATUS[0]}" = 0

# A QEMU run from its build directory looks for firmware under qemu-bundle/
# (the configured --firmwarepath, relocated): point that at Debian's
# seabios and ipxe-qemu packages.
for fw in /usr/share/seabios /usr/lib/ipxe/qemu; do
    if [ ! -e "$bdir/qemu-bundle$fw" ]; then
        mkdir -p "$(dirname "$bdir/qemu-bundle$fw")"
        ln -s "$fw" "$bdir/qemu-bundle$fw"
    fi
done
