#!/bin/bash
# Build the benchmark/test guest: a Debian bookworm kernel and an initramfs
# holding busybox, fio and nvme-cli with their shared-library closure.
#
#   guest/mkimage.sh [OUTDIR]          (default build/guest; `make guest`)
#
# Everything comes from Debian packages fetched with `apt-get download`
# (nothing is installed on the host).  The result is cached: OUTDIR/stamp
# holds a hash of the package versions (including every library package of
# the last build) and of the files in guest/; when it matches, nothing is
# done.  FORCE=1 rebuilds.
#
# Outputs:
#   OUTDIR/vmlinuz            the kernel (linux-image-amd64's vmlinuz)
#   OUTDIR/initramfs.cpio.gz  the /init of guest/init plus the root below
#   OUTDIR/root/              the image root (kept for inspection)
#   OUTDIR/fw/                linuxboot_dma.bin & co. from bookworm's
#                             qemu-system-data (pass -L OUTDIR/fw to QEMU)
#   OUTDIR/manifest.json      package versions, modules, libraries
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec /usr/bin/python3 "$here/mkimage.py" "${1:-build/guest}"
