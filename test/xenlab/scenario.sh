#!/bin/bash
# Runs in the lab's dom0 (as /lab/scenario.sh); settings from /lab/params:
#   XENLAB_DIRECT="disk.raw disk.vhd"   images served on the direct ring: tapkit is the
#                                       blkif backend on backend/vbd (blkback not loaded)
#   XENLAB_KERNEL="disk.vhd"            images served on the kernel-device path: the
#                                       block-tapkit-mount hotplug script gives the stock
#                                       blkback a loop device over tapkit's FUSE export
#   XENLAB_LOOP="disk.raw"              images on a plain loop device under the stock blkback
#                                       (the reference for bench/xenlab-seqread.sh)
#   XENLAB_MKFS=1                       the guest also makes ext4 and fsck's it
#   XENLAB_BENCH=1                      the guest only times sequential reads
# For each image: copy /lab/IMAGE to tmpfs, create a PV domU whose own blkfront checks the
# disk (domu-init.sh; its console lands in /lab/console-PATH-IMAGE.log), wait for it to
# power off, copy the image back to /lab/out-PATH-IMAGE for the host to check.
set -uo pipefail
. /lab/params
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
export UV_THREADPOOL_SIZE=8
say() { echo "XENLAB-SCENARIO [$(cut -d' ' -f1 /proc/uptime)] $*"; }
status=0
n=0
guest_timeout=${XENLAB_GUEST_TIMEOUT:-600}

# diagnose NAME: what dom0 looks like while a guest is stuck (kernel stacks of the
# tasks in D state, FUSE connections waiting, loop devices, the tapkit mounts' logs).
diagnose() {
  local out=/lab/diag-$1.txt p
  {
    echo "== uptime $(cat /proc/uptime)"
    echo "== losetup"; losetup -l 2>&1
    for p in /sys/block/loop*/loop; do [ -d "$p" ] && echo "$p dio=$(cat $p/dio 2>/dev/null)"; done
    echo "== fuse connections (waiting, max_background, congestion_threshold)"
    for p in /sys/fs/fuse/connections/*; do [ -d "$p" ] && echo "$p $(cat $p/waiting) $(cat $p/max_background) $(cat $p/congestion_threshold)"; done
    echo "== tasks (state, wchan, kernel stack)"
    for p in /proc/[0-9]*; do
      local st; st=$(awk '/^State:/{print $2}' $p/status 2>/dev/null)
      case "$(cat $p/comm 2>/dev/null)" in node|loop*|blkback*|xl|kworker*) ;; *) [ "$st" = D ] || continue ;; esac
      echo "-- ${p#/proc/} $(cat $p/comm 2>/dev/null) $st $(cat $p/wchan 2>/dev/null)"
      for t in $p/task/*; do echo "   task ${t##*/} $(awk '/^State:/{print $2}' $t/status 2>/dev/null) $(cat $t/wchan 2>/dev/null)"; cat $t/stack 2>/dev/null | sed 's/^/      /'; done
    done
    echo "== tapkit mount logs"
    for p in /run/tapkit/xen/*/out /var/log/xen/tapkit-mount-*.log; do [ -f "$p" ] && { echo "-- $p"; cat "$p"; }; done
    echo w > /proc/sysrq-trigger 2>/dev/null
    echo "== dmesg (with sysrq-w: blocked tasks)"; dmesg | tail -n 300
  } > "$out" 2>&1
  say "diagnostics in $out"
}

# run_domu PATH IMAGE DISK-LINE: one guest over one image; sets status on failure.
run_domu() {
  local path=$1 image=$2 disk=$3 name start i
  n=$((n+1))
  name=domu$n
  local extra="console=hvc0 quiet"
  [ "${XENLAB_MKFS:-0}" = 1 ] && extra="$extra xenlab_mkfs=1"
  [ "${XENLAB_BENCH:-0}" = 1 ] && extra="$extra xenlab_bench=1"
  cat > /tmp/$name.cfg <<CFG
name = "$name"
type = "pv"
kernel = "/boot/vmlinuz"
ramdisk = "/boot/domu.cpio.gz"
extra = "$extra"
memory = 160
vcpus = 1
on_poweroff = "destroy"
on_crash = "destroy"
disk = [ "$disk" ]
CFG
  start=$(date +%s)
  if ! xl create /tmp/$name.cfg; then
    say "$path $image: xl create failed"; status=14; return
  fi
  say "$path $image: $name created in $(( $(date +%s) - start )) s"
  i=0
  while xl list $name >/dev/null 2>&1; do
    [ $i -ge $((guest_timeout * 2)) ] && { say "$path $image: $name still running after $guest_timeout s"; diagnose "$name"; xl destroy $name; status=17; break; }
    sleep 0.5; i=$((i+1))
  done
  say "$path $image: $name gone after $(( $(date +%s) - start )) s"
  cp /var/log/xen/console/guest-$name.log "/lab/console-$path-$image.log" 2>/dev/null
  grep XENLAB-DOMU "/lab/console-$path-$image.log"
  grep -q XENLAB-DOMU-DONE "/lab/console-$path-$image.log" || status=16
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
if [ -n "${XENLAB_DIRECT:-}" ]; then
  lsmod | grep -q xen_blkback && { say "xen-blkback is loaded: it would take backend/vbd"; exit 11; }
  # tapkit watches backend/vbd before xl create (libxl gives the backend 10 s for InitWait).
  say "starting tapkit xen serve"
  if [ "${XENLAB_CORE:-0}" = 1 ]; then ulimit -c unlimited; echo '/lab/core.%p' > /proc/sys/kernel/core_pattern; fi
  TAPKIT_XEN_TRACE=${XENLAB_TRACE:-0} tapkit xen serve --platform xen > >(tee /lab/tapkit-serve.log) 2>&1 &
  tapkit=$!
  i=0
  until grep -q 'tapkit xen: serving' /lab/tapkit-serve.log 2>/dev/null; do
    kill -0 $tapkit 2>/dev/null || { say "tapkit exited"; exit 12; }
    [ $i -ge 900 ] && { say "tapkit did not start in 180 s"; kill $tapkit; exit 13; }
    sleep 0.2; i=$((i+1))
  done
  say "tapkit serving"
  ended=0
  for image in $XENLAB_DIRECT; do
    cp "/lab/$image" "/tmp/$image" || { status=10; continue; }
    # A no-op hotplug script lets libxl take a regular file as the phy target; tapkit
    # opens the target (the vbd's params) as a tapkit spec: the format is probed.
    run_domu direct "$image" "format=raw, vdev=xvda, access=rw, backendtype=phy, script=/etc/xen/scripts/block-noop, target=/tmp/$image"
    # The toolstack removes the vbd with the domain: wait until tapkit has closed the image.
    ended=$((ended+1)); i=0
    until [ "$(grep -c ': ended' /lab/tapkit-serve.log)" -ge $ended ] || [ $i -ge 150 ]; do sleep 0.2; i=$((i+1)); done
    cp "/tmp/$image" "/lab/out-direct-$image" || status=15
    rm -f "/tmp/$image"
  done
  kill -TERM $tapkit
  i=0; while kill -0 $tapkit 2>/dev/null && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done
  kill -0 $tapkit 2>/dev/null && { say "tapkit did not exit on SIGTERM"; kill -KILL $tapkit; status=18; }
  wait $tapkit; say "tapkit xen serve exit status $?"
fi

# ---- the kernel-device path ----------------------------------------------------------
if [ -n "${XENLAB_KERNEL:-}" ]; then
  modprobe xen-blkback || { say "cannot load xen-blkback"; exit 19; }
  cp /project/examples/xen/block-tapkit-mount /etc/xen/scripts/ && chmod +x /etc/xen/scripts/block-tapkit-mount
  for image in $XENLAB_KERNEL; do
    cp "/lab/$image" "/tmp/$image" || { status=10; continue; }
    run_domu kernel "$image" "format=raw, vdev=xvda, access=rw, backendtype=phy, script=/etc/xen/scripts/block-tapkit-mount, target=/tmp/$image"
    # The hotplug script's remove ran `tapkit unmount`: no FUSE mount may be left.
    i=0; while grep -q ' fuse' /proc/mounts && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done
    grep ' fuse' /proc/mounts && { say "a FUSE mount is left"; status=20; }
    cat /var/log/xen/tapkit-mount-*.log >> /lab/tapkit-mount.log 2>/dev/null; rm -f /var/log/xen/tapkit-mount-*.log
    cp "/tmp/$image" "/lab/out-kernel-$image" || status=15
    rm -f "/tmp/$image"
  done
fi
# ---- a plain loop device under the stock blkback (no tapkit) ----------------------------
if [ -n "${XENLAB_LOOP:-}" ]; then
  modprobe xen-blkback || { say "cannot load xen-blkback"; exit 19; }
  for image in $XENLAB_LOOP; do
    cp "/lab/$image" "/tmp/$image" || { status=10; continue; }
    dev=$(losetup -f --show "/tmp/$image") || { status=21; continue; }
    run_domu loop "$image" "format=raw, vdev=xvda, access=rw, backendtype=phy, target=$dev"
    losetup -d "$dev"
    cp "/tmp/$image" "/lab/out-loop-$image" || status=15
    rm -f "/tmp/$image"
  done
fi
sync
exit $status
