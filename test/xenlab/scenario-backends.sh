#!/bin/bash
# The lab's scenario for the backend types and grant copy (test/lab-backends/backends.lab.ts copies
# it to RUN_DIR/scenario.sh; it runs in dom0 like scenario.sh). Settings from /lab/params:
#   XENLAB_GRANTS=auto|copy|map   how tapkit moves request data (--grant-access; default auto)
#   XENLAB_VBD="disk.raw"         direct ring on backend/vbd (`xl create`, blkback not loaded)
#   XENLAB_QDISK="disk.vhd"       backendtype=qdisk: libxl starts examples/xen/tapkit-qemu-dm
#                                 (device_model_override) as the guest's device model
#   XENLAB_VBD3="disk.raw"        a disk-less guest, then `tapkit xen attach --backend-type vbd3`
#                                 while it runs: its blkfront hot-plugs the disk
# For each image as in scenario.sh: a copy in tmpfs, a PV guest that checks the disk
# (domu-init.sh; console in /lab/console-WAY-IMAGE.log), the image copied back to
# /lab/out-WAY-IMAGE; tapkit's logs in /lab/tapkit-WAY*.log.
set -uo pipefail
. /lab/params
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
export UV_THREADPOOL_SIZE=8
say() { echo "XENLAB-SCENARIO [$(cut -d' ' -f1 /proc/uptime)] $*"; }
grants=${XENLAB_GRANTS:-auto}
status=0
n=0

# create_domu WAY IMAGE DISK-LINE [CFG-LINES] [EXTRA-ARGS]: writes the config, `xl create`; sets $name.
create_domu() {
  local way=$1 image=$2 disk=$3 cfg=${4:-} extra="console=hvc0 quiet xenlab_mkfs=1 ${5:-}" start
  n=$((n+1)); name=domu$n
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
disk = [ $disk ]
$cfg
CFG
  start=$(date +%s)
  xl create /tmp/$name.cfg || { say "$way $image: xl create failed"; status=14; return 1; }
  say "$way $image: $name created in $(( $(date +%s) - start )) s"
}

# wait_domu WAY IMAGE: until the guest is gone (bounded), then its console to /lab.
wait_domu() {
  local way=$1 image=$2 i=0 start
  start=$(date +%s)
  while xl list $name >/dev/null 2>&1; do
    [ $i -ge 1200 ] && { say "$way $image: $name still running after 600 s"; xl destroy $name; status=17; break; }
    sleep 0.5; i=$((i+1))
  done
  say "$way $image: $name gone after $(( $(date +%s) - start )) s"
  cp /var/log/xen/console/guest-$name.log "/lab/console-$way-$image.log" 2>/dev/null
  grep XENLAB-DOMU "/lab/console-$way-$image.log"
  grep -q XENLAB-DOMU-DONE "/lab/console-$way-$image.log" || status=16
}

# serve TYPE LOG: `tapkit xen serve` for one backend type in the background; sets $tapkit.
serve() {
  local i=0
  TAPKIT_XEN_TRACE=${XENLAB_TRACE:-0} tapkit xen serve --platform xen --backend-type "$1" --grant-access "$grants" > >(tee "$2") 2>&1 &
  tapkit=$!
  until grep -q 'tapkit xen: serving' "$2" 2>/dev/null; do
    kill -0 $tapkit 2>/dev/null || { say "tapkit ($1) exited"; exit 12; }
    [ $i -ge 900 ] && { say "tapkit ($1) did not start in 180 s"; kill $tapkit; exit 13; }
    sleep 0.2; i=$((i+1))
  done
  say "tapkit serving backend/$1"
}

# stop PID WHAT: SIGTERM, bounded.
stop() {
  local i=0
  kill -TERM "$1"
  while kill -0 "$1" 2>/dev/null && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done
  kill -0 "$1" 2>/dev/null && { say "$2 did not exit on SIGTERM"; kill -KILL "$1"; status=18; }
  wait "$1"; say "$2 exit status $?"
}

# wait_ended LOG COUNT: until tapkit logged COUNT devices ended (it closed their images).
wait_ended() {
  local i=0
  until [ "$(grep -c ': ended' "$1")" -ge "$2" ] || [ $i -ge 150 ]; do sleep 0.2; i=$((i+1)); done
}

lsmod | grep -q xen_blkback && { say "xen-blkback is loaded: it would take backend/vbd"; exit 11; }

# ---- backend/vbd through xl --------------------------------------------------------
if [ -n "${XENLAB_VBD:-}" ]; then
  serve vbd /lab/tapkit-vbd.log
  ended=0
  for image in $XENLAB_VBD; do
    cp "/lab/$image" "/tmp/$image" || { status=10; continue; }
    create_domu vbd "$image" "\"format=raw, vdev=xvda, access=rw, backendtype=phy, script=/etc/xen/scripts/block-noop, target=/tmp/$image\"" && wait_domu vbd "$image"
    ended=$((ended+1)); wait_ended /lab/tapkit-vbd.log $ended
    cp "/tmp/$image" "/lab/out-vbd-$image" || status=15
    rm -f "/tmp/$image"
  done
  stop $tapkit "tapkit xen serve (vbd)"
fi

# ---- backend/qdisk: tapkit as the guest's device model ----------------------------------
if [ -n "${XENLAB_QDISK:-}" ]; then
  cp /project/examples/xen/tapkit-qemu-dm /etc/xen/scripts/ && chmod +x /etc/xen/scripts/tapkit-qemu-dm
  # libxl starts the device model with xl's environment.
  export TAPKIT_QEMU_STUB_OPTIONS="--grant-access $grants"
  for image in $XENLAB_QDISK; do
    cp "/lab/$image" "/tmp/$image" || { status=10; continue; }
    case $image in *.vhd) format=vhd ;; *) format=raw ;; esac
    if create_domu qdisk "$image" "\"format=$format, vdev=xvda, access=rw, backendtype=qdisk, target=/tmp/$image\"" \
        "device_model_version = \"qemu-xen\"
device_model_override = \"/etc/xen/scripts/tapkit-qemu-dm\""; then
      wait_domu qdisk "$image"
    fi
    # libxl killed the stub with the domain; it exits once its device has closed the image.
    i=0; while grep -qs 'qemu-stub' /proc/[0-9]*/cmdline && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done
    grep -qs 'qemu-stub' /proc/[0-9]*/cmdline && { say "qdisk $image: the stub is still running"; status=22; }
    cp /var/log/xen/qemu-dm-$name.log "/lab/tapkit-qdisk-$image.log" 2>/dev/null
    cat "/lab/tapkit-qdisk-$image.log" 2>/dev/null
    cp "/tmp/$image" "/lab/out-qdisk-$image" || status=15
    rm -f "/tmp/$image"
  done
fi

# ---- backend/vbd3: attached to a running guest -------------------------------------------
if [ -n "${XENLAB_VBD3:-}" ]; then
  serve vbd3 /lab/tapkit-vbd3.log
  ended=0
  for image in $XENLAB_VBD3; do
    cp "/lab/$image" "/tmp/$image" || { status=10; continue; }
    if create_domu vbd3 "$image" "" "" "xenlab_wait=900"; then
      domid=$(xl domid $name)
      start=$(date +%s)
      if tapkit xen attach --platform xen --backend-type vbd3 --domid "$domid" --devid 51712 "/tmp/$image"; then
        say "vbd3 $image: attached to domain $domid in $(( $(date +%s) - start )) s"
      else
        say "vbd3 $image: tapkit xen attach failed"; status=23; xl destroy $name
      fi
      wait_domu vbd3 "$image"
      # xl does not know the vbd3: the toolstack's part of the teardown is ours.
      tapkit xen detach --platform xen --backend-type vbd3 --domid "$domid" --devid 51712 --timeout 20 || say "vbd3 $image: detach reported a problem"
    fi
    ended=$((ended+1)); wait_ended /lab/tapkit-vbd3.log $ended
    cp "/tmp/$image" "/lab/out-vbd3-$image" || status=15
    rm -f "/tmp/$image"
  done
  stop $tapkit "tapkit xen serve (vbd3)"
fi
sync
exit $status
