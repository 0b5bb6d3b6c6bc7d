#!/bin/bash
# make check-tsan: the nvme qtests of the IOThread configurations against
# QEMU built with clang's ThreadSanitizer (build/qemu-tsan), with QEMU's own
# suppressions and the TSAN_OPTIONS docs/devel/testing/main.rst gives.
#
# Every report is kept (build/check-tsan/tsan.*) and counted twice: all of
# them, and those with a frame in hw/nvme/ (the code the series touches).
# Reports without one are QEMU's own (glib is not built with TSan here, so
# its locks are invisible and yield false positives) and are listed, not
# fixed.  Exit status: 1 if a test failed or a report has a frame in hw/nvme/
# that tests/tsan/nvme.tsan does not explain.
#
#   TSAN_TESTS  grep pattern of the nvme-io-test paths (default: iothread)
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
tree=$top/build/qemu
bdir=$top/build/qemu-tsan
out=$top/build/check-tsan
pattern=${TSAN_TESTS:-iothread}

QEMU_BUILD_DIR=$bdir QEMU_CC=clang QEMU_CXX=clang++ \
QEMU_CONFIGURE_EXTRA="--enable-tsan --extra-cflags=-O1" \
    "$top/scripts/build-qemu.sh" "$tree" qemu-system-x86_64 tests/qtest/nvme-io-test || exit 1

rm -rf "$out"
mkdir -p "$out"
supp=$out/suppressions.tsan
cat "$tree/tests/tsan/suppressions.tsan" "$top/tests/tsan/nvme.tsan" >"$supp"
# die_after_fork=0: the qtest forks QEMU (libqtest), which then execs
export TSAN_OPTIONS="suppressions=$supp detect_deadlocks=false history_size=7 exitcode=0 die_after_fork=0 log_path=$out/tsan"
export QTEST_QEMU_BINARY=$bdir/qemu-system-x86_64

pass=0 fail=0
for t in $("$bdir/tests/qtest/nvme-io-test" -l | grep '^/' | grep -e "$pattern"); do
    if timeout 600 "$bdir/tests/qtest/nvme-io-test" --tap -p "$t" >"$out/last.log" 2>&1 &&
       grep -q '^ok ' "$out/last.log"; then
        pass=$((pass + 1))
    else
        fail=$((fail + 1))
        echo "not ok - $t"
        grep -E 'ERROR|Bail out' "$out/last.log" | head -3 | sed 's/^/# /'
    fi
done
[ $((pass + fail)) -gt 0 ] || { echo "check-tsan: no test matched '$pattern'"; exit 1; }

/usr/bin/python3 "$top/scripts/tsan-report.py" "$out"
rc=$?
echo "check-tsan: $pass passed, $fail failed"
[ "$fail" = 0 ] && [ "$rc" = 0 ]
