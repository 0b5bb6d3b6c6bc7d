#!/bin/bash
# Fetch the base QEMU tree the series applies to.
#
#   scripts/fetch-base.sh OUTDIR
#
# Default: 'apt-get source qemu/trixie' (QEMU 10.0.x upstream tarball plus
# Debian's patches), unpacked into OUTDIR/src.  With QEMU_SRC=/path the given
# tree is used instead (a git checkout is read with 'git archive HEAD', so
# only committed files count).  Writes OUTDIR/VERSION, one line naming the
# exact base, and OUTDIR/tree, the path of the source tree.
set -euo pipefail
out=$1
mkdir -p "$out"
out=$(cd "$out" && pwd)

if [ -n "${QEMU_SRC:-}" ]; then
    src=$(cd "$QEMU_SRC" && pwd)
    [ -f "$src/VERSION" ] && [ -f "$src/hw/nvme/ctrl.c" ] ||
        { echo "fetch-base: QEMU_SRC=$QEMU_SRC is not a QEMU source tree" >&2; exit 1; }
    desc="QEMU $(cat "$src/VERSION") from $src"
    if [ "$(git -C "$src" rev-parse --show-toplevel 2>/dev/null)" = "$src" ]; then
        desc="$desc (git $(git -C "$src" describe --always --dirty 2>/dev/null))"
    fi
    echo "$desc" >"$out/VERSION.new"
    echo "$src" >"$out/tree"
    mv "$out/VERSION.new" "$out/VERSION"
    echo "fetch-base: base is $desc"
    exit 0
fi

if [ -f "$out/VERSION" ] && [ -f "$out/tree" ] && [ -d "$(cat "$out/tree")" ]; then
    exit 0
fi

rm -rf "$out/debian-src"
mkdir -p "$out/debian-src"
echo "fetch-base: apt-get source qemu/trixie"
(cd "$out/debian-src" &&
    apt-get source -qq qemu/trixie 2>&1 | grep -v -e '^dpkg-source: info:' -e 'unsandboxed as root' || true)
dsc=$(ls "$out"/debian-src/qemu_*.dsc 2>/dev/null | head -1)
[ -n "$dsc" ] || { echo "fetch-base: apt-get source qemu/trixie failed (is the trixie deb-src entry there? run scripts/host-deps.sh)" >&2; exit 1; }
debver=$(sed -n 's/^Version: //p' "$dsc")
src=$(ls -d "$out"/debian-src/qemu-*/ | head -1)
src=${src%/}
upver=$(cat "$src/VERSION")
case "$upver" in
    10.0.*) ;;
    *) echo "fetch-base: trixie ships QEMU $upver, the series is for 10.0.x" >&2; exit 1 ;;
esac
echo "QEMU $upver (Debian trixie source package qemu $debver)" >"$out/VERSION"
echo "$src" >"$out/tree"
echo "fetch-base: base is $(cat "$out/VERSION")"
