#!/bin/bash
# Runs in the lab's dom0 (as /lab/scenario.sh); settings from /lab/params:
#   XENLAB_DIRECT="disk.raw disk.vhd"   images served on the direct ring: tapkit is the
#                                       blkif backend on backend/vbd (blkback not loaded)
#   XENLAB_DIRECT_ALSO="copy map"       the direct ring again with these --grant-access modes
#   XENLAB_KERNEL="disk.vhd"            images served on the kernel-device path: the
#                                       block-tapkit-mount hotplug script gives the stock
#                                       blkback a loop device over tapkit's FUSE export
#   XENLAB_LOOP="disk.raw"              images on a plain loop device under the stock blkback
#                                       (the reference for bench/xenlab-seqread.sh)
#   XENLAB_MKFS=1                       the guest also makes ext4 and fsck's it
#   XENLAB_BENCH=1                      the guest only times sequential reads
#   (and lab-lib.sh's: XENLAB_GRANTS, XENLAB_GUEST_TIMEOUT, XENLAB_PROFILE, XENLAB_STRACE, ...)
# For each image: copy /lab/IMAGE to tmpfs, create a PV domU whose own blkfront checks the
# disk (domu-init.sh; its console lands in /lab/console-PATH-IMAGE.log), wait for it to
# power off, copy the image back to /lab/out-PATH-IMAGE for the host to check.
set -uo pipefail
. /lab/params
. /lab/lab-lib.sh   # say, create_domu, wait_domu, serve, stop, wait_ended, diagnose

# run_domu PATH IMAGE DISK-LINE: one guest over one image; sets status on failure.
run_domu() {
  create_domu "$1" "$2" "\"$3\"" && wait_domu "$1" "$2"
}

# ---- a first look at the platform (XENLAB_DIAG=1) ----------------------------------------
if [ "${XENLAB_DIAG:-0}" = 1 ]; then
  timeout 180 /opt/node -e '
    const t0 = Date.now(); const log = (m) => console.log(`XENLAB-DIAG ${Date.now() - t0}ms ${m}`);
    const { XenPlatform } = require("/opt/tapkit/dist/core/ring/xen/platform");
    log("loaded");
    const p = new XenPlatform(); log("opened");
    p.store.write("/local/domain/0/tapkit-diag", "x").then(() => p.store.read("/local/domain/0/tapkit-diag")).then((v) => {
      log("read back " + v);
      return p.store.watch("/local/domain/0/tapkit-diag", (path) => log("watch " + path));
    }).then((w) => new Promise((r) => setTimeout(r, 500)).then(() => w.cancel()))
      .then(() => p.close()).then(() => log("closed"), (e) => log("error " + e.message));
  '
  say "platform diagnostic exit status $?"
fi

# ---- how long Node and tapkit take to start in dom0 (XENLAB_PROBE=1) -------------------
if [ "${XENLAB_PROBE:-0}" = 1 ]; then
  probe() {
    local t0 t1
    t0=$(cut -d' ' -f1 /proc/uptime); "$@" >/dev/null 2>&1; t1=$(cut -d' ' -f1 /proc/uptime)
    say "probe $(awk "BEGIN{print $t1 - $t0}") s: $*"
  }
  for flags in "" "--jitless" "--max-lazy" "--no-opt --no-sparkplug"; do
    probe /opt/node $flags -e 0
    probe /opt/node $flags /opt/tapkit/dist/core/cli/main.js --version
    probe /opt/node $flags -e 'require("/opt/tapkit/node_modules/undici")'
  done
  mkdir -p /tmp/probe-mnt
  for flags in "" "--jitless"; do
    t0=$(cut -d' ' -f1 /proc/uptime)
    /opt/node $flags /opt/tapkit/dist/core/cli/main.js mount --loop memory:16M /tmp/probe-mnt > /tmp/probe.out 2>&1 &
    i=0; until grep -q '^/dev/loop' /tmp/probe.out || [ $i -ge 3000 ]; do sleep 0.1; i=$((i+1)); done
    say "probe $(awk "BEGIN{print $(cut -d' ' -f1 /proc/uptime) - $t0}") s: tapkit mount --loop $flags"
    t0=$(cut -d' ' -f1 /proc/uptime)
    dd if=$(grep '^/dev/loop' /tmp/probe.out) of=/dev/null bs=1M iflag=direct 2>/dev/null
    say "probe $(awk "BEGIN{print $(cut -d' ' -f1 /proc/uptime) - $t0}") s: dd 16M from the loop device $flags"
    t0=$(cut -d' ' -f1 /proc/uptime)
    /opt/node $flags /opt/tapkit/dist/core/cli/main.js unmount /tmp/probe-mnt; wait
    say "probe $(awk "BEGIN{print $(cut -d' ' -f1 /proc/uptime) - $t0}") s: tapkit unmount $flags"
  done
fi

# ---- the direct ring ---------------------------------------------------------------
[ -n "${XENLAB_DIRECT:-}" ] && direct_ring direct /lab/tapkit-serve.log $XENLAB_DIRECT
# The same again with other --grant-access modes (bench/xenlab-seqread.sh compares them):
# console-direct-MODE-IMAGE.log, tapkit-serve-MODE.log.
for mode in ${XENLAB_DIRECT_ALSO:-}; do
  all=$grants; grants=$mode
  direct_ring direct-$mode /lab/tapkit-serve-$mode.log $XENLAB_DIRECT
  grants=$all
done

# ---- the kernel-device path ----------------------------------------------------------
if [ -n "${XENLAB_KERNEL:-}" ]; then
  modprobe xen-blkback || { say "cannot load xen-blkback"; exit 19; }
  cp /project/examples/xen/block-tapkit-mount /etc/xen/scripts/ && chmod +x /etc/xen/scripts/block-tapkit-mount
  for image in $XENLAB_KERNEL; do
    image_in "$image" || continue
    run_domu kernel "$image" "format=raw, vdev=xvda, access=rw, backendtype=phy, script=/etc/xen/scripts/block-tapkit-mount, target=/tmp/$image"
    # The hotplug script's remove ran `tapkit unmount`: no FUSE mount may be left.
    i=0; while grep -q ' fuse' /proc/mounts && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done
    grep ' fuse' /proc/mounts && { say "a FUSE mount is left"; status=20; }
    cat /var/log/xen/tapkit-mount-*.log >> /lab/tapkit-mount.log 2>/dev/null; rm -f /var/log/xen/tapkit-mount-*.log
    image_out kernel "$image"
  done
fi
# ---- a plain loop device under the stock blkback (no tapkit) ----------------------------
if [ -n "${XENLAB_LOOP:-}" ]; then
  modprobe xen-blkback || { say "cannot load xen-blkback"; exit 19; }
  for image in $XENLAB_LOOP; do
    image_in "$image" || continue
    dev=$(losetup -f --show "/tmp/$image") || { status=21; continue; }
    run_domu loop "$image" "format=raw, vdev=xvda, access=rw, backendtype=phy, target=$dev"
    losetup -d "$dev"
    image_out loop "$image"
  done
fi
sync
exit $status
