#!/bin/bash
# make fuzz: build QEMU's generic-fuzz target (libFuzzer + ASan + UBSan,
# clang from Debian) and run it on each nvme configuration.
#
#   FUZZ_TIME     seconds per configuration (default 600)
#   FUZZ_CONFIGS  generic-fuzz configurations (default: nvme nvme-ioeventfd
#                 nvme-iothread nvme-iothread-poll)
#
# Each configuration starts from the seeds in fuzz/seeds/<config>/ (or
# fuzz/seeds/common/) plus the corpus of earlier runs in build/fuzz/.
# Crashes land in build/fuzz/<config>/ and fail the target.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
tree=$top/build/qemu
fbdir=$top/build/qemu-fuzz
out=$top/build/fuzz
time=${FUZZ_TIME:-600}
configs=${FUZZ_CONFIGS:-nvme nvme-ioeventfd nvme-iothread nvme-iothread-poll}

QEMU_BUILD_DIR=$fbdir QEMU_CC=clang QEMU_CXX=clang++ \
QEMU_CONFIGURE_EXTRA="--enable-fuzzing --enable-asan --enable-ubsan" \
    "$top/scripts/build-qemu.sh" "$tree" qemu-fuzz-x86_64

fail=0
for cfg in $configs; do
    dir=$out/$cfg
    mkdir -p "$dir/corpus"
    seeds=$top/fuzz/seeds/$cfg
    [ -d "$seeds" ] || seeds=$top/fuzz/seeds/common
    echo "fuzz: generic-fuzz-$cfg for ${time}s, seeds from ${seeds#"$top"/}"
    rm -f "$dir"/crash-* "$dir"/leak-* "$dir"/timeout-* "$dir"/oom-*
    (cd "$fbdir" &&
     ASAN_OPTIONS=detect_leaks=0 \
     ./qemu-fuzz-x86_64 --fuzz-target="generic-fuzz-$cfg" \
        -max_total_time="$time" -timeout=20 -rss_limit_mb=4096 \
        -artifact_prefix="$dir/" -print_final_stats=1 \
        "$dir/corpus" "$seeds") >"$dir/log" 2>&1 || true
    stats=$(grep -E '^stat::number_of_executed_units|^stat::average_exec_per_sec' "$dir/log" |
            sed 's/^stat:://' | tr -s ' \n' '  ' || true)
    cov=$(grep -E '^#[0-9]+.*(DONE|pulse|REDUCE|NEW|INITED)' "$dir/log" | tail -1 |
          grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9/]+[a-zA-Z]*' || true)
    crashes=$(find "$dir" -maxdepth 1 \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
    echo "fuzz: $cfg: $stats$cov; corpus $(ls "$dir/corpus" | wc -l) inputs; $crashes crashes (log: ${dir#"$top"/}/log)"
    if [ "$crashes" != 0 ] || grep -q 'ERROR: AddressSanitizer\|runtime error:' "$dir/log"; then
        grep -m3 -A12 'ERROR: AddressSanitizer\|runtime error:' "$dir/log" || true
        fail=1
    fi
done
exit $fail
