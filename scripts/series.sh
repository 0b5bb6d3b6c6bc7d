#!/bin/bash
# Materialize and export the patch series.
#
#   scripts/series.sh sync     create build/qemu (base commit + git am patches/*)
#                              or bring it up to date with patches/
#   scripts/series.sh export   write the commits above the base to patches/
#   scripts/series.sh verify   fail if patches/ and build/qemu disagree
#
# build/qemu is a git repository: one commit holding the base (tagged
# 'nvme-dataplane-base'), then one commit per patch.  Edit and commit there,
# then 'make export'.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
tree=$top/build/qemu
patches=$top/patches
basedir=$top/build/base
BASE_TAG=nvme-dataplane-base
STAMP=$tree/.git/nvme-dataplane-applied

die() { echo "series: $*" >&2; exit 1; }
g() { git -C "$tree" "$@"; }

patches_hash() {
    cat "$patches"/*.patch 2>/dev/null | sha256sum | cut -d' ' -f1
}

# Reproducible identities and dates: the base commit id depends only on
# the base tree.
export GIT_AUTHOR_NAME="nvme-dataplane" GIT_AUTHOR_EMAIL="nvme-dataplane@localhost"
export GIT_COMMITTER_NAME="nvme-dataplane" GIT_COMMITTER_EMAIL="nvme-dataplane@localhost"

apply_patches() {
    local p
    for p in "$patches"/*.patch; do
        [ -e "$p" ] || continue
        if ! out=$(g am --keep-cr --committer-date-is-author-date "$p" 2>&1); then
            g am --abort >/dev/null 2>&1 || true
            echo "$out" >&2
            die "patch $(basename "$p") does not apply (see git am's message above)"
        fi
    done
    echo "$(g rev-parse HEAD) $(patches_hash)" >"$STAMP"
}

create() {
    local src
    src=$(cat "$basedir/tree")
    echo "series: creating build/qemu from $(cat "$basedir/VERSION")"
    rm -rf "$tree.new"
    mkdir -p "$tree.new"
    if [ "$(git -C "$src" rev-parse --show-toplevel 2>/dev/null)" = "$src" ]; then
        git -C "$src" archive HEAD | tar -x -C "$tree.new"
    else
        tar -C "$src" --exclude=./.pc --exclude=./debian --exclude=./build \
            --exclude=./.git -cf - . | tar -x -C "$tree.new"
    fi
    (
        cd "$tree.new"
        git init -q -b master
        git config core.autocrlf false
        git config user.name "nvme-dataplane"
        git config user.email "nvme-dataplane@localhost"
        git add -A -f .
        GIT_AUTHOR_DATE="2000-01-01T00:00:00Z" GIT_COMMITTER_DATE="2000-01-01T00:00:00Z" \
            git commit -q -m "base: $(cat "$basedir/VERSION")"
        git tag "$BASE_TAG"
    )
    mv "$tree.new" "$tree"
    apply_patches
    echo "series: applied $(ls "$patches"/*.patch 2>/dev/null | wc -l) patches"
}

sync() {
    if [ ! -d "$tree/.git" ]; then
        create
        return
    fi
    local head hash
    read -r head hash <"$STAMP" 2>/dev/null || true
    if [ "$(g rev-parse HEAD)" = "${head:-}" ] && [ "$(patches_hash)" = "${hash:-}" ]; then
        return
    fi
    if [ "$(g rev-parse HEAD)" != "${head:-}" ]; then
        # Commits made in build/qemu: the developer's work.  Leave it alone;
        # 'make check' reports it if it has not been exported.
        return
    fi
    # patches/ changed (git pull, checkout) and build/qemu has nothing of
    # its own: re-apply.  Only files that differ are rewritten, so the next
    # build stays incremental.
    [ -z "$(g status --porcelain --untracked-files=no)" ] ||
        die "patches/ changed but build/qemu has uncommitted edits; commit or discard them first"
    echo "series: patches/ changed, re-applying onto $BASE_TAG"
    g reset -q --hard "$BASE_TAG"
    apply_patches
}

format() {
    # Byte-reproducible: no version signature, zeroed commit ids, fixed
    # abbreviation and diff settings whatever the user's git config says.
    rm -f "$1"/*.patch
    g -c core.abbrev=12 -c diff.algorithm=myers -c diff.noprefix=false \
        -c diff.mnemonicPrefix=false -c diff.renames=true -c format.signOff=false \
        format-patch -q --no-signature --zero-commit --numbered --no-cover-letter \
        --no-base --encode-email-headers -o "$1" "$BASE_TAG"..HEAD >/dev/null
}

export_series() {
    [ -d "$tree/.git" ] || die "no build/qemu yet: run make"
    [ -z "$(g status --porcelain --untracked-files=no)" ] ||
        die "build/qemu has uncommitted changes; commit them first"
    mkdir -p "$patches"
    format "$patches"
    echo "$(g rev-parse HEAD) $(patches_hash)" >"$STAMP"
    echo "series: exported $(ls "$patches"/*.patch 2>/dev/null | wc -l) patches to patches/"
}

verify() {
    [ -d "$tree/.git" ] || die "no build/qemu yet: run make"
    local tmp
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    format "$tmp"
    if ! diff -r -q "$patches" "$tmp" >/dev/null 2>&1; then
        echo "series: patches/ and build/qemu disagree:" >&2
        diff -r -q "$patches" "$tmp" 2>&1 | sed "s|$tmp|build/qemu|" >&2 || true
        die "run 'make export' to write build/qemu's commits to patches/, or
        'make reapply' to throw build/qemu's commits away and re-apply patches/"
    fi
    if [ -n "$(g status --porcelain --untracked-files=no)" ]; then
        die "build/qemu has uncommitted changes: commit and 'make export' them"
    fi
}

reapply() {
    [ -d "$tree/.git" ] || { create; return; }
    g reset -q --hard "$BASE_TAG"
    apply_patches
    echo "series: re-applied patches/ onto $BASE_TAG"
}

case "${1:-}" in
    sync) sync ;;
    export) export_series ;;
    verify) verify ;;
    reapply) reapply ;;
    *) die "usage: $0 sync|export|verify|reapply" ;;
esac
