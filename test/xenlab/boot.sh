#!/usr/bin/env bash
# Boots the Xen lab in QEMU (TCG): Xen, the PV dom0 from build.sh, the project shared
# read-only and RUN_DIR shared read-write into dom0. dom0 runs RUN_DIR/scenario.sh if
# there is one (otherwise a smoke check; lab-lib.sh, the functions scenarios share, is
# copied next to it) and powers off. The serial console goes to
# RUN_DIR/serial.log (and stdout with --verbose). Bounded: QEMU is killed after
# TIMEOUT seconds (default 900).
#
#   test/xenlab/boot.sh [--verbose] RUN_DIR [LAB_DIR]
# Exit status: the scenario's, 124 when QEMU was killed, 1 when dom0 never reported.
set -euo pipefail
verbose=0
[ "${1:-}" = --verbose ] && { verbose=1; shift; }
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
run=$(cd "${1:?usage: boot.sh [--verbose] RUN_DIR [LAB_DIR]}" && pwd)
lab=${2:-$repo/.tmp/xenlab}
timeout=${XENLAB_TIMEOUT:-900}
[ -f "$lab/dom0.cpio.gz" ] || { echo "xenlab: no lab in $lab (run test/xenlab/build.sh)" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || { echo "xenlab: qemu-system-x86_64 is missing (Debian package qemu-system-x86)" >&2; exit 1; }
# Node and tapkit (dist/ and the production node_modules) reach dom0 through the run
# directory as two big files, which dom0 copies into its RAM: loading hundreds of small
# modules over 9p under TCG takes minutes.
ln -f "$(readlink -f "$(command -v node)")" "$run/node" 2>/dev/null || cp "$(readlink -f "$(command -v node)")" "$run/node"
[ -f "$repo/dist/core/cli/main.js" ] || { echo "xenlab: tapkit is not built (npm run build)" >&2; exit 1; }
# Only what runs: dom0 unpacks every file under emulation (about 40 ms each), so sources of
# native addons, type declarations, maps and documents stay behind.
( cd "$repo" && tar -cf "$run/tapkit.tar" --exclude=dist/test --exclude=dist/bench \
    --exclude='node_modules/*/deps' --exclude='node_modules/*/build/Release/obj.target' --exclude='node_modules/*/build/Release/.deps' \
    --exclude='*.d.ts' --exclude='*.map' --exclude='*.md' --exclude='node_modules/*/test' --exclude='node_modules/*/example' --exclude='.github' \
    package.json dist \
    $(npm ls --omit=dev --parseable --all 2>/dev/null | sed "s#^$repo/##" | grep '^node_modules/' | sort -u) )
# The shell functions the scenarios source (as /lab/lab-lib.sh): this checkout's.
cp "$here/lab-lib.sh" "$run/lab-lib.sh"
rm -f "$run/exit-status"
# -cpu max,-fsgsbase,-xsave: with FSGSBASE or XSAVE (and so AVX), dom0's processes
# (busybox, xl, node) segfault once a domU runs under QEMU 7.2 TCG + Xen 4.17: their FS
# base (TLS) and, it seems, their extended register state do not survive domain switches.
# smap=0: under QEMU's TCG, SMAP makes the PV dom0 fault in its first instructions.
xen_args="console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all dom0_mem=${XENLAB_DOM0_MEM:-1024M},max:${XENLAB_DOM0_MEM:-1024M} dom0_max_vcpus=2 noreboot smap=0"
out=/dev/null
[ $verbose = 1 ] && out=/dev/stdout
set +e
timeout --kill-after=10 "$timeout" qemu-system-x86_64 -accel "${XENLAB_ACCEL:-tcg,thread=multi}" -cpu "${XENLAB_CPU:-max,-fsgsbase,-xsave}" -smp 2 -m "${XENLAB_MEM:-2048}" \
  -nographic -no-reboot -monitor none -serial stdio -nic none \
  -kernel "$lab/xen" -append "$xen_args" \
  -initrd "$lab/vmlinuz console=hvc0 earlyprintk=xen ${XENLAB_DOM0_ARGS:-},$lab/dom0.cpio.gz" \
  -virtfs "local,path=$repo,mount_tag=project,security_model=none,readonly=on,id=project" \
  -virtfs "local,path=$run,mount_tag=lab,security_model=none,id=lab" \
  </dev/null 2>&1 | tee "$run/serial.log" > "$out"
qemu=${PIPESTATUS[0]}
set -e
[ "$qemu" = 124 ] || [ "$qemu" = 137 ] && { echo "xenlab: QEMU killed after ${timeout}s; serial log in $run/serial.log" >&2; exit 124; }
if [ -f "$run/exit-status" ]; then exit "$(cat "$run/exit-status")"; fi
grep -q XENLAB-DOM0-SMOKE-OK "$run/serial.log" && [ ! -f "$run/scenario.sh" ] && exit 0
echo "xenlab: dom0 did not report (QEMU status $qemu); serial log in $run/serial.log" >&2
exit 1
