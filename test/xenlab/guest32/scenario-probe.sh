#!/bin/bash
# By hand only (issue #9; no test runs it): dom0 side of the CPUID probe. Copied to
# RUN_DIR/scenario.sh with RUN_DIR/probe-{full,skipflat,legacy}.elf (cpuid-probe.S) and,
# optionally, RUN_DIR/vmlinuz32 + domu32.cpio.gz (build32.sh) and the xen-hvmctx/xenctx
# programs from the lab's unpacked Xen (.tmp/xenlab/x/usr/lib/xen-4.17/bin). Each guest runs
# until it powers off, dies or 60 s pass; a guest that crashed or rebooted is kept
# (on_crash/on_reboot = preserve: a triple fault is a "reboot" for HVM) and its HVM context
# dumped into RUN_DIR before it is destroyed. Xen's console lines go to RUN_DIR/xl-dmesg.log.
set -uo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
say() { echo "XENLAB-SCENARIO [$(cut -d' ' -f1 /proc/uptime)] $*"; }
run_guest() { # name cfg-lines...
  local name=$1; shift
  printf '%s\n' "name = \"$name\"" 'type = "pvh"' 'tsc_mode = "native"' 'vcpus = 1' \
    'on_poweroff = "destroy"' 'on_reboot = "preserve"' 'on_crash = "preserve"' "$@" > /tmp/$name.cfg
  xl create /tmp/$name.cfg || { say "$name: xl create failed"; return; }
  local i=0 state
  while state=$(xl list "$name" 2>/dev/null | awk 'NR==2{print $5}') && [ -n "$state" ]; do
    case $state in *s*|*c*) break;; esac
    [ $i -ge 120 ] && { say "$name: still running after 60 s"; break; }
    sleep 0.5; i=$((i+1))
  done
  say "$name: state '${state:-gone}' after $((i/2)) s"
  if [ -n "$state" ]; then
    local id; id=$(xl domid "$name")
    [ -x /lab/xen-hvmctx ] && /lab/xen-hvmctx "$id" > "/lab/hvmctx-$name.txt" 2>&1
    [ -x /lab/xenctx ] && /lab/xenctx -a "$id" > "/lab/xenctx-$name.txt" 2>&1
    xl destroy "$name"
  fi
}
for p in full skipflat legacy; do
  [ -f /lab/probe-$p.elf ] && run_guest probe-$p "kernel = \"/lab/probe-$p.elf\"" 'memory = 32'
done
if [ -f /lab/vmlinuz32 ]; then
  run_guest linux32 'kernel = "/lab/vmlinuz32"' 'ramdisk = "/lab/domu32.cpio.gz"' \
    'extra = "console=hvc0 earlyprintk=xen"' 'memory = 192'
  cp /var/log/xen/console/guest-linux32.log /lab/console-linux32.log 2>/dev/null
fi
xl dmesg > /lab/xl-dmesg.log
grep -E 'XEN32-PROBE|Triple|Insn|emulation' /lab/xl-dmesg.log
sync
exit 0
