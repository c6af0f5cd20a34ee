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
# repeat. The host's 1-minute load average is printed with the result, and what dom0's
# CPU did during each guest (busy seconds over all its vCPUs) and tapkit's own CPU time.
#
# Where tapkit's time goes (these slow it down: not for the ratio):
#   XENLAB_PROFILE=1   tapkit runs under `node --cpu-prof`; the .cpuprofile is kept
#   XENLAB_STRACE=1    tapkit runs under `strace -c -f` (the host's strace, copied into the
#                      run); the syscall summary is kept
#   XENLAB_GRANTS=map  tapkit's --grant-access (default auto: persistent grants kept
#                      mapped, else grant copy)
#   XENLAB_ALSO="copy map"  the direct ring again in the same boot with these modes (each
#                      one more guest; printed as more lines and ratios)
#   XENLAB_KEEP=DIR    the run's logs (consoles, tapkit's log, profiles) are copied to DIR
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-64}
bash test/xenlab/build.sh
npm run build --silent
run=$(mktemp -d "${TMPDIR:-/tmp}/tapkit-xenlab-bench-XXXXXX")
trap 'rm -rf "$run"' EXIT
head -c "$((size * 1024 * 1024))" /dev/urandom > "$run/disk.raw"
cp test/xenlab/scenario.sh "$run/scenario.sh"
printf 'XENLAB_DIRECT="disk.raw"\nXENLAB_DIRECT_ALSO="%s"\nXENLAB_LOOP="disk.raw"\nXENLAB_BENCH=1\nXENLAB_GRANTS=%s\nXENLAB_PROFILE=%s\nXENLAB_STRACE=%s\n' \
  "${XENLAB_ALSO:-}" "${XENLAB_GRANTS:-auto}" "${XENLAB_PROFILE:-0}" "${XENLAB_STRACE:-0}" > "$run/params"
if [ "${XENLAB_STRACE:-0}" = 1 ]; then
  # dom0's libraries are the host's (build.sh copies them): strace's own go alongside it.
  cp "$(command -v strace)" "$run/strace"
  mkdir -p "$run/strace-lib"
  ldd "$(command -v strace)" | grep -o '/[^ ]*' | grep -v -e '/libc\.so' -e '/ld-linux' | xargs -r cp -L -t "$run/strace-lib"
fi
keep() { [ -n "${XENLAB_KEEP:-}" ] && mkdir -p "$XENLAB_KEEP" && find "$run" -maxdepth 2 -type f \( -name '*.log' -o -name '*.cpuprofile' -o -name '*.strace' \) -exec cp -t "$XENLAB_KEEP" {} +; true; }
load_before=$(cut -d' ' -f1 /proc/loadavg)
XENLAB_TIMEOUT=${XENLAB_TIMEOUT:-1800} bash test/xenlab/boot.sh "$run" || { keep; echo "lab run failed; serial log:" >&2; tail -n 60 "$run/serial.log" >&2; exit 1; }
keep
load_after=$(cut -d' ' -f1 /proc/loadavg)
median() { grep -a XENLAB-DOMU-BENCH-SECONDS "$1" | awk '{ print $3 - $2 }' | sort -n | sed -n 2p; }
direct=$(median "$run/console-direct-disk.raw.log")
loop=$(median "$run/console-loop-disk.raw.log")
echo "sequential read of ${size} MiB by the guest (median of 3 rounds, guest seconds):"
echo "  tapkit direct ring (--grant-access ${XENLAB_GRANTS:-auto}): ${direct} s"
echo "  blkback on a loop device:  ${loop} s"
awk -v d="$direct" -v l="$loop" 'BEGIN { printf "  ratio tapkit/blkback time: %.2f (above 1: tapkit slower)\n", d / l }'
for mode in ${XENLAB_ALSO:-}; do
  other=$(median "$run/console-direct-$mode-disk.raw.log")
  echo "  tapkit direct ring (--grant-access $mode): ${other} s"
  awk -v d="$other" -v l="$loop" -v m="$mode" 'BEGIN { printf "  ratio tapkit (%s)/blkback time: %.2f\n", m, d / l }'
done
echo "  host load average: ${load_before} before, ${load_after} after; CPUs: $(nproc)"
echo "dom0 (whole guest runs: boot, 3 rounds, poweroff) and tapkit:"
grep -a -o -e 'direct[-a-z]* disk.raw: domu[0-9]* gone after.*' -e 'loop disk.raw: domu[0-9]* gone after.*' -e 'tapkit xen serve (direct[-a-z]*) CPU.*' -e 'ended (.*' -e 'xen platform calls.*' "$run/dom0.log" | sed 's/^/  /'

