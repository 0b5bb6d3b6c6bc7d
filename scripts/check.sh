#!/bin/bash
# make check: checkpatch on every patch, the nvme qtests, the guest tests.
# Every suite counts the test cases it ran; a suite that runs none fails.
# Ends with one line: "N passed, N failed, N skipped".  SKIP_GUEST=1 leaves
# the guest tests out; CONFIGS=a,b picks the guest tests' configurations.
# The python parts need the Makefile's PYTHONPATH (nvdp/, build/qemu/python).
set -uo pipefail
: "${PYTHONPATH:?run through make (make check), which sets PYTHONPATH}"
top=$(cd "$(dirname "$0")/.." && pwd)
tree=$top/build/qemu
bdir=${CHECK_BUILD_DIR:-$tree/build}   # make check-asan: the ASan build
logdir=$top/build/check${CHECK_BUILD_DIR:+-$(basename "$CHECK_BUILD_DIR")}
mkdir -p "$logdir"

passed=0
failed=0
skipped=0
failures=()

# record NAME OK(0|1) [detail]
record() {
    if [ "$2" = 0 ]; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        failures+=("$1${3:+ ($3)}")
        echo "FAIL: $1${3:+ ($3)}"
    fi
}

# run_tap SUITE LOG CMD...: run a TAP-producing test binary, count its cases
run_tap() {
    local suite=$1 log=$2; shift 2
    local start ok nok skip rc
    start=$(date +%s)
    "$@" >"$log" 2>&1
    rc=$?
    ok=$(grep '^ok ' "$log" | grep -vc '# SKIP')
    skip=$(grep '^ok ' "$log" | grep -c '# SKIP')
    nok=$(grep -c '^not ok ' "$log")
    passed=$((passed + ok))
    failed=$((failed + nok))
    skipped=$((skipped + skip))
    grep '^not ok ' "$log" | sed "s|^|FAIL: $suite: |"
    grep '^not ok ' "$log" | while read -r l; do echo "$suite: $l"; done >>"$logdir/failures"
    echo "$suite: $ok passed, $nok failed, $skip skipped in $(( $(date +%s) - start ))s (log: ${log#"$top"/})"
    if [ $((ok + nok)) = 0 ]; then
        record "$suite: ran no test" 1
    elif [ "$rc" != 0 ] && [ "$nok" = 0 ]; then
        record "$suite: exited $rc" 1 "see $log"
    fi
}

: >"$logdir/failures"

# 1. patches/ is what build/qemu holds
if [ -n "${CHECK_QTESTS_ONLY:-}" ]; then
    :
elif out=$("$top/scripts/series.sh" verify 2>&1); then
    record "series: patches/ matches build/qemu" 0
else
    echo "$out"
    record "series: patches/ matches build/qemu" 1 "run make export"
fi

# 2. checkpatch on every patch of the series
n=0
for p in "$top"/patches/*.patch; do
    [ -z "${CHECK_QTESTS_ONLY:-}" ] || break
    [ -e "$p" ] || continue
    n=$((n + 1))
    if out=$(cd "$tree" && scripts/checkpatch.pl --strict "$p" 2>&1); then
        record "checkpatch $(basename "$p")" 0
    else
        echo "$out" | grep -E '^(ERROR|WARNING)' -A3 | head -40
        record "checkpatch $(basename "$p")" 1
    fi
done
if [ -z "${CHECK_QTESTS_ONLY:-}" ]; then
    echo "checkpatch: $n patches"
    [ "$n" -gt 0 ] || record "checkpatch: no patches in patches/" 1
fi

# 3. qtests
export QTEST_QEMU_BINARY=$bdir/qemu-system-x86_64
export QTEST_QEMU_IMG=$bdir/qemu-img
export G_TEST_DBUS_DAEMON=$tree/tests/dbus-vmstate-daemon.sh
export PYTHON=/usr/bin/python3
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0} UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
# run_each BINARY [PATTERN]: the cases whose path matches PATTERN, one
# process per case (a failed g_assert aborts its process, not the suite;
# and glib's -p runs a single case, not the cases below a path).
run_each() {
    local bin=$1 pattern=${2:-.} t out rc
    for t in $("$bin" -l | grep '^/' | grep -e "$pattern"); do
        out=$(timeout 300 "$bin" --tap -p "$t" 2>&1)
        rc=$?
        if [ $rc = 0 ] && grep -q '^ok ' <<<"$out" && ! grep -q '^not ok ' <<<"$out" &&
           ! grep -q 'ERROR: AddressSanitizer\|runtime error:' <<<"$out"; then
            echo "ok - $t"
        else
            echo "not ok - $t (exit $rc)"
            grep -E 'ERROR|Bail out|^not ok|runtime error' <<<"$out" | head -3 | sed 's/^/# /'
        fi
    done
}
run_tap "qos-test (nvme)" "$logdir/qos-test-nvme.log" \
    run_each "$bdir/tests/qtest/qos-test" /nvme/
run_tap "nvme-io-test" "$logdir/nvme-io-test.log" \
    run_each "$bdir/tests/qtest/nvme-io-test"

# the libvirt example's QEMU arguments still start a controller in an IOThread
if [ -z "${CHECK_QTESTS_ONLY:-}" ]; then
    run_tap "examples" "$logdir/examples.log" \
        /usr/bin/python3 "$top/examples/libvirt/check.py" "$bdir/qemu-system-x86_64"
fi

# 4. guest tests (fio verify, nvme-cli, reset in a Debian guest); the
#    image is built from Debian packages on first use (make guest)
if [ -z "${SKIP_GUEST:-}" ] && [ -z "${CHECK_QTESTS_ONLY:-}" ]; then
    if make -s -C "$top" guest >"$logdir/guest-image.log" 2>&1; then
        run_tap "guest" "$logdir/guest.log" /usr/bin/python3 "$top/tests/guest/run.py" \
            ${CONFIGS:+--configs "$CONFIGS"}
    else
        tail -20 "$logdir/guest-image.log"
        record "guest image (make guest)" 1 "see $logdir/guest-image.log"
    fi
fi

# 5. the libvirt example under a real libvirtd (tests/libvirt/run.py installs
#    libvirt from Debian's archive if it is missing, runs its own daemons)
if [ -z "${SKIP_LIBVIRT:-}" ] && [ -z "${SKIP_GUEST:-}" ] &&
   [ -z "${CHECK_QTESTS_ONLY:-}" ] && [ -z "${CHECK_BUILD_DIR:-}" ]; then
    run_tap "libvirt" "$logdir/libvirt.log" /usr/bin/python3 "$top/tests/libvirt/run.py" \
        --qemu "$bdir/qemu-system-x86_64"
fi

echo
if [ ${#failures[@]} -gt 0 ] || [ -s "$logdir/failures" ]; then
    echo "Failures:"
    for f in "${failures[@]}"; do echo "  $f"; done
    sed 's/^/  /' "$logdir/failures"
fi
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
