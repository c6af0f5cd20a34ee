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
XENLAB_MKFS=${XENLAB_MKFS:-1}   # every guest makes ext4 and fsck's it
. /lab/lab-lib.sh   # say, create_domu, wait_domu, serve, stop, wait_ended, diagnose

lsmod | grep -q xen_blkback && { say "xen-blkback is loaded: it would take backend/vbd"; exit 11; }

# ---- backend/vbd through xl --------------------------------------------------------
[ -n "${XENLAB_VBD:-}" ] && direct_ring vbd /lab/tapkit-vbd.log $XENLAB_VBD

# ---- backend/qdisk: tapkit as the guest's device model ----------------------------------
if [ -n "${XENLAB_QDISK:-}" ]; then
  cp /project/examples/xen/tapkit-qemu-dm /etc/xen/scripts/ && chmod +x /etc/xen/scripts/tapkit-qemu-dm
  # libxl starts the device model with xl's environment.
  export TAPKIT_QEMU_STUB_OPTIONS="--grant-access $grants"
  for image in $XENLAB_QDISK; do
    image_in "$image" || continue
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
    image_out qdisk "$image"
  done
fi

# ---- backend/vbd3: attached to a running guest -------------------------------------------
if [ -n "${XENLAB_VBD3:-}" ]; then
  serve vbd3 /lab/tapkit-vbd3.log
  ended=0
  for image in $XENLAB_VBD3; do
    image_in "$image" || continue
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
    image_out vbd3 "$image"
  done
  stop $tapkit "tapkit xen serve (vbd3)"
fi
sync
exit $status
