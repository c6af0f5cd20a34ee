#!/bin/sh
# The domU's /init in the Xen lab: a real Linux blkfront against the disk dom0 gives it.
# It prints the disk's size and checksum, writes a marker into the disk's last KiB, and, when dom0
# asked for it on the kernel command line (xenlab_mkfs=1), makes an ext4 file system
# over the rest and checks it. Results are XENLAB-DOMU-* lines on the console.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo XENLAB-DOMU-INIT
modprobe xen-blkfront
# How long to wait for the disk: xenlab_wait=SECONDS (default 300). A disk hot-plugged after
# boot (vbd3) comes late, and on the kernel-device path a slow dom0 may hand blkback its loop
# device after the guest started (block-tapkit-mount finishes in the background).
hotplug_wait=$(sed -n 's/.*xenlab_wait=\([0-9]*\).*/\1/p' /proc/cmdline)
i=0; while [ ! -b /dev/xvda ] && [ $i -lt $(( ${hotplug_wait:-300} * 10 )) ]; do sleep 0.1; i=$((i+1)); done
if [ ! -b /dev/xvda ]; then echo "XENLAB-DOMU-FAIL no /dev/xvda"; poweroff -f; fi
echo "XENLAB-DOMU-SECTORS $(cat /sys/block/xvda/size)"
if grep -q xenlab_bench=1 /proc/cmdline; then
  # bench/xenlab-seqread.sh: sequential reads of the whole disk, caches dropped each round.
  for round in 1 2 3; do
    echo 3 > /proc/sys/vm/drop_caches
    t0=$(cut -d' ' -f1 /proc/uptime)
    dd if=/dev/xvda of=/dev/null bs=1M 2>/dev/null
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo "XENLAB-DOMU-BENCH-SECONDS $t0 $t1"
  done
  echo XENLAB-DOMU-DONE
  poweroff -f
fi
echo "XENLAB-DOMU-MD5 $(md5sum /dev/xvda | cut -d' ' -f1)"
sectors=$(cat /sys/block/xvda/size)
# The marker goes into the last KiB; the file system (if asked for) covers all but the last MiB.
printf 'hello-from-domU-blkfront' | dd of=/dev/xvda bs=512 seek=$((sectors - 2)) conv=notrunc,fsync 2>/dev/null && echo XENLAB-DOMU-MARKER-WRITTEN
if grep -q xenlab_mkfs=1 /proc/cmdline; then
  if mkfs.ext4 -q -F /dev/xvda $(( (sectors * 512 - 1048576) / 1024 ))k >/tmp/mkfs.log 2>&1; then
    echo XENLAB-DOMU-MKFS-OK
  else
    echo XENLAB-DOMU-MKFS-FAIL; cat /tmp/mkfs.log
  fi
  sync
  echo 3 > /proc/sys/vm/drop_caches
  if e2fsck -f -n /dev/xvda >/tmp/fsck.log 2>&1; then echo XENLAB-DOMU-FSCK-CLEAN; else echo XENLAB-DOMU-FSCK-DIRTY; cat /tmp/fsck.log; fi
fi
# Read everything again through the ring, not from the page cache.
sync; echo 3 > /proc/sys/vm/drop_caches
echo "XENLAB-DOMU-MD5-AFTER $(md5sum /dev/xvda | cut -d' ' -f1)"
echo XENLAB-DOMU-DONE
poweroff -f
