#!/bin/bash
# Configure (once, or when the options change) and build QEMU in TREE/build.
#
#   scripts/build-qemu.sh TREE [ninja targets...]
#
# Extra configure options: QEMU_CONFIGURE_EXTRA.  ccache is used when present.
set -euo pipefail
tree=$(cd "$1" && pwd); shift
bdir=$tree/build

opts=(
    --target-list=x86_64-softmmu
    --enable-kvm --enable-tcg
    --enable-linux-aio --enable-linux-io-uring --enable-slirp
    --disable-download --disable-install-blobs --disable-docs
    --disable-werror
    --python=/usr/bin/python3
    --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu
)
if [ -x /usr/lib/ccache/gcc ] && [ -z "${QEMU_CC:-}" ]; then
    opts+=(--cc=/usr/lib/ccache/gcc --cxx=/usr/lib/ccache/g++ --host-cc=/usr/lib/ccache/gcc)
    export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$(dirname "$tree")}
    export CCACHE_NOHASHDIR=1
elif [ -n "${QEMU_CC:-}" ]; then
    opts+=(--cc="$QEMU_CC")
fi
# shellcheck disable=SC2206
opts+=(${QEMU_CONFIGURE_EXTRA:-})

want="${opts[*]}"
if [ ! -f "$bdir/build.ninja" ] || [ "$(cat "$bdir/.nvme-dataplane-configure" 2>/dev/null)" != "$want" ]; then
    echo "build-qemu: configuring $(basename "$tree"): $want"
    rm -rf "$bdir"
    mkdir -p "$bdir"
    (cd "$bdir" && ../configure "${opts[@]}" >configure.log 2>&1) || {
        tail -40 "$bdir/configure.log" >&2
        echo "build-qemu: configure failed, see $bdir/configure.log" >&2
        exit 1
    }
    echo "$want" >"$bdir/.nvme-dataplane-configure"
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(qemu-system-x86_64 qemu-img)
echo "build-qemu: ninja ${targets[*]}"
ninja -C "$bdir" -j"$(nproc)" "${targets[@]}" | grep -v -e '^\[[0-9]*/[0-9]*\] ' || true
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
