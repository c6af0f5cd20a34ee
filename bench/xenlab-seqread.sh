#!/usr/bin/env bash
# Sequential read of one disk image by a Linux PV guest in the Xen lab, through tapkit's
# direct ring (`tapkit xen serve --platform xen`) and through the kernel's blkback on a
# plain loop device over the same file. Under TCG absolute numbers mean nothing; the
# ratio is what counts. Not run by the tests.
#
#   bench/xenlab-seqread.sh [SIZE_MIB]      (default 64)
# Each guest reads the whole disk three times with `dd bs=1M` (caches dropped each round);
# the median round of each path is compared. The two paths run one after the other in
# the same dom0, so the host's load at the time matters: run on a quiet machine and
# repeat. The host's 1-minute load average is printed with the result.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-64}
bash test/xenlab/build.sh
npm run build --silent
run=$(mktemp -d "${TMPDIR:-/tmp}/tapkit-xenlab-bench-XXXXXX")
trap 'rm -rf "$run"' EXIT
head -c "$((size * 1024 * 1024))" /dev/urandom > "$run/disk.raw"
cp test/xenlab/scenario.sh "$run/scenario.sh"
printf 'XENLAB_DIRECT="disk.raw"\nXENLAB_LOOP="disk.raw"\nXENLAB_BENCH=1\n' > "$run/params"
load_before=$(cut -d' ' -f1 /proc/loadavg)
XENLAB_TIMEOUT=${XENLAB_TIMEOUT:-1800} bash test/xenlab/boot.sh "$run" || { echo "lab run failed; serial log:" >&2; tail -n 60 "$run/serial.log" >&2; exit 1; }
load_after=$(cut -d' ' -f1 /proc/loadavg)
median() { grep -a XENLAB-DOMU-BENCH-SECONDS "$1" | awk '{ print $3 - $2 }' | sort -n | sed -n 2p; }
direct=$(median "$run/console-direct-disk.raw.log")
loop=$(median "$run/console-loop-disk.raw.log")
echo "sequential read of ${size} MiB by the guest (median of 3 rounds, guest seconds):"
echo "  tapkit direct ring:        ${direct} s"
echo "  blkback on a loop device:  ${loop} s"
awk -v d="$direct" -v l="$loop" 'BEGIN { printf "  ratio tapkit/blkback time: %.2f (above 1: tapkit slower)\n", d / l }'
echo "  host load average: ${load_before} before, ${load_after} after; CPUs: $(nproc)"
