#!/bin/bash
# Runs in the lab's dom0 (as /lab/scenario.sh): tapkit is the blkif backend on
# backend/vbd (the kernel's blkback is not loaded). For each image in XENLAB_IMAGES it
# copies /lab/IMAGE to tmpfs, creates a PV domU whose own blkfront checks the disk
# (domu-init.sh, console kept in /lab/console-IMAGE.log), waits for it to power off, and
# copies the image back to /lab/out-IMAGE for the host to check.
# Settings come from /lab/params: XENLAB_IMAGES (space separated), XENLAB_MKFS (0/1).
set -uo pipefail
. /lab/params
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
export UV_THREADPOOL_SIZE=8
say() { echo "XENLAB-SCENARIO $*"; }
lsmod | grep -q xen_blkback && { say "xen-blkback is loaded: it would take backend/vbd"; exit 11; }

# tapkit watches backend/vbd before xl create (libxl gives the backend 10 s for InitWait).
/lab/node /project/dist/core/cli/main.js xen serve --platform xen > /lab/tapkit.log 2>&1 &
tapkit=$!
i=0
until grep -q 'tapkit xen: serving' /lab/tapkit.log; do
  kill -0 $tapkit 2>/dev/null || { say "tapkit exited"; cat /lab/tapkit.log; exit 12; }
  [ $i -ge 900 ] && { say "tapkit did not start in 180 s"; kill $tapkit; exit 13; }
  sleep 0.2; i=$((i+1))
done
say "tapkit serving"

status=0
n=0
for image in $XENLAB_IMAGES; do
  n=$((n+1))
  name=domu$n
  cp "/lab/$image" "/tmp/$image" || { status=10; break; }
  extra="console=hvc0 quiet"
  [ "${XENLAB_MKFS:-0}" = 1 ] && extra="$extra xenlab_mkfs=1"
  # A no-op hotplug script lets libxl take a regular file as the phy: target; tapkit
  # opens the target (params) as a tapkit spec, so the image's format is probed.
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
disk = [ "format=raw, vdev=xvda, access=rw, backendtype=phy, script=/etc/xen/scripts/block-noop, target=/tmp/$image" ]
CFG
  start=$(date +%s)
  if ! xl create /tmp/$name.cfg; then
    say "$image: xl create failed"; status=14; continue
  fi
  say "$image: $name created in $(( $(date +%s) - start )) s"
  i=0
  while xl list $name >/dev/null 2>&1; do
    [ $i -ge 1200 ] && { say "$image: $name still running after 600 s"; xl destroy $name; status=17; break; }
    sleep 0.5; i=$((i+1))
  done
  say "$image: $name gone after $(( $(date +%s) - start )) s"
  cp /var/log/xen/console/guest-$name.log "/lab/console-$image.log" 2>/dev/null
  grep XENLAB-DOMU "/lab/console-$image.log"
  grep -q XENLAB-DOMU-DONE "/lab/console-$image.log" || status=16
  # The toolstack removed the vbd when the domain went: tapkit has closed the image.
  i=0; until grep -q "vbd [0-9]*/51712: ended" /lab/tapkit.log && [ "$(grep -c 'ended' /lab/tapkit.log)" -ge $n ] || [ $i -ge 100 ]; do sleep 0.2; i=$((i+1)); done
  cp "/tmp/$image" "/lab/out-$image" || status=15
  rm -f "/tmp/$image"
done

kill -TERM $tapkit
i=0; while kill -0 $tapkit 2>/dev/null && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
kill -0 $tapkit 2>/dev/null && { say "tapkit did not exit on SIGTERM"; kill -KILL $tapkit; status=18; }
wait $tapkit; say "tapkit exit status $?"
cat /lab/tapkit.log
sync
exit $status
