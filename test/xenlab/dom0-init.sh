#!/bin/sh
# dom0's /init in the Xen lab: mounts, loads the Xen drivers, starts xenstored and
# xenconsoled, mounts the two 9p shares (the project read-only at /project, the run's
# directory read-write at /lab), runs /lab/scenario.sh with bash, and powers off.
# The scenario's exit status lands in /lab/exit-status; XENLAB-DOM0-* lines mark progress
# on the serial console.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run && mkdir -p /run/xen /run/xenstored
mount -t tmpfs tmpfs /tmp
# devtmpfs has no /dev/fd or /dev/stdin; locking.sh loops forever without them.
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
echo XENLAB-DOM0-INIT
# Progress marks with dom0's uptime, to see where a slow boot spends its time.
mark() { echo "XENLAB-DOM0-T $(cut -d' ' -f1 /proc/uptime) $*"; }
for m in xen-evtchn xen-privcmd xenfs xen-gntdev xen-gntalloc loop fuse virtio_pci 9pnet_virtio 9p; do modprobe $m || echo "xenlab: modprobe $m failed"; done
mount -t xenfs xenfs /proc/xen
mark modules loaded
mkdir -p /project /lab
# The virtio devices bind asynchronously: try the mounts for a while.
i=0; until mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 project /project 2>/dev/null || [ $i -ge 50 ]; do sleep 0.2; i=$((i+1)); done
grep -q " /project " /proc/mounts || echo "xenlab: no project share"
mount -t 9p -o trans=virtio,version=9p2000.L,rw,msize=262144 lab /lab || echo "xenlab: no lab share"
mark 9p mounted
xenstored --pid-file=/run/xenstored.pid
i=0; while [ ! -S /run/xenstored/socket ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mark xenstored up
xen-init-dom0
mark xen-init-dom0 done
mkdir -p /var/log/xen/console
xenconsoled --log=guest --log-dir=/var/log/xen/console
# tapkit and Node in RAM (boot.sh packed them), and a `tapkit` command.
if [ -f /lab/tapkit.tar ]; then
  # One big sequential read: tar's own small reads over 9p took over a minute under TCG.
  mkdir -p /opt/tapkit && dd if=/lab/tapkit.tar bs=1M 2>/dev/null | tar -x -C /opt/tapkit
  mark tapkit unpacked
  dd if=/lab/node of=/opt/node bs=1M 2>/dev/null && chmod +x /opt/node
  mark node copied
  printf '#!/bin/sh\nexec /opt/node /opt/tapkit/dist/core/cli/main.js "$@"\n' > /usr/bin/tapkit && chmod +x /usr/bin/tapkit
fi
echo XENLAB-DOM0-READY
if [ -f /lab/scenario.sh ]; then
  # Everything the scenario says goes to the serial console too, as it happens.
  { bash /lab/scenario.sh 2>&1; echo $? > /tmp/scenario-status; } | tee /lab/dom0.log
  status=$(cat /tmp/scenario-status)
  echo $status > /lab/exit-status
  echo "XENLAB-DOM0-SCENARIO-EXIT $status"
else
  xl info | grep -E 'xen_version|virt_caps|total_memory'
  xl list
  ls /dev/xen
  ls /project/package.json /lab/node && /opt/node -e 'console.log("XENLAB-DOM0-NODE " + process.version)'
  echo XENLAB-DOM0-SMOKE-OK
fi
sync
poweroff -f
