#!/bin/bash
# By hand only (issue #9; no test runs it): dom0 side of the 32-bit PVH probe. Copied by hand
# to RUN_DIR/scenario.sh, with RUN_DIR/vmlinuz32, RUN_DIR/domu32.cpio.gz (build32.sh) and
# RUN_DIR/disk.raw; then `test/xenlab/boot.sh RUN_DIR`. tapkit serves the direct ring; the
# guest is PVH (tsc_mode native: QEMU's TCG SVM has no NRIP-save, see xen-lab.md 4d).
# In the TCG lab the guest never gets past its first CPUID (see README.md here and docs/xen-lab.md).
# Success: tapkit-serve.log says "connected: x86_32-abi" and the guest prints its MD5.
set -uo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
say() { echo "XENLAB-SCENARIO [$(cut -d' ' -f1 /proc/uptime)] $*"; }
lsmod | grep -q xen_blkback && { say "xen-blkback is loaded"; exit 11; }
tapkit xen serve --platform xen > >(tee /lab/tapkit-serve.log) 2>&1 &
tapkit=$!
i=0
until grep -q 'tapkit xen: serving' /lab/tapkit-serve.log 2>/dev/null; do
  kill -0 $tapkit 2>/dev/null || { say "tapkit exited"; exit 12; }
  [ $i -ge 900 ] && { say "tapkit did not start"; exit 13; }
  sleep 0.2; i=$((i+1))
done
say "tapkit serving"
cp /lab/disk.raw /tmp/disk.raw
cat > /tmp/domu32.cfg <<CFG
name = "domu32"
type = "pvh"
tsc_mode = "native"
kernel = "/lab/vmlinuz32"
ramdisk = "/lab/domu32.cpio.gz"
extra = "console=hvc0 quiet"
memory = 192
vcpus = 1
on_poweroff = "destroy"
on_crash = "destroy"
disk = [ "format=raw, vdev=xvda, access=rw, backendtype=phy, script=/etc/xen/scripts/block-noop, target=/tmp/disk.raw" ]
CFG
status=0
xl create /tmp/domu32.cfg || { say "xl create failed"; status=14; }
i=0; proto=
while xl list domu32 >/dev/null 2>&1; do
  [ -z "$proto" ] && proto=$(xenstore-read "/local/domain/$(xl domid domu32)/device/vbd/51712/protocol" 2>/dev/null) && say "frontend protocol: $proto"
  [ $i -ge 1200 ] && { say "domu32 still running after 600 s"; xl destroy domu32; status=17; break; }
  sleep 0.5; i=$((i+1))
done
cp /var/log/xen/console/guest-domu32.log /lab/console-domu32.log 2>/dev/null
cp /var/log/xen/qemu-dm-domu32.log /var/log/xen/xl-domu32.log /lab/ 2>/dev/null
grep XENLAB-DOMU /lab/console-domu32.log
grep -q XENLAB-DOMU-DONE /lab/console-domu32.log || status=16
grep -q 'connected: x86_32-abi' /lab/tapkit-serve.log && say "tapkit: connected x86_32-abi" || { say "tapkit did not connect x86_32-abi"; status=${status/#0/22}; }
sleep 2; cp /tmp/disk.raw /lab/out-disk.raw
kill -TERM $tapkit; wait $tapkit
sync
exit $status
