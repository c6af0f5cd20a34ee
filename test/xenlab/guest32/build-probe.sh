#!/usr/bin/env bash
# Builds the three variants of the CPUID probe (cpuid-probe.S) into OUT_DIR as
# probe-{full,skipflat,legacy}.elf: 32-bit PVH ELF images (XEN_ELFNOTE_PHYS32_ENTRY at 1 MiB).
# Needs gcc with -m32 support for assembling only (no libraries are linked).
# Quick check without Xen: qemu-system-x86_64 -accel tcg -cpu max -m 64 -display none \
#   -nodefaults -debugcon stdio -kernel OUT_DIR/probe-full.elf   (prints stages 1-4, then hangs in HLT)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-probe.sh OUT_DIR}
mkdir -p "$out"
for v in full: skipflat:-DSKIP_FLAT legacy:-DLEGACY_PAGING; do
  gcc -m32 ${v#*:} -nostdlib -static -no-pie -Wl,--build-id=none -Wl,--no-warn-rwx-segments \
    -T "$here/cpuid-probe.ld" -o "$out/probe-${v%%:*}.elf" "$here/cpuid-probe.S"
done
ls "$out"/probe-*.elf
