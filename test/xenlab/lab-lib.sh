# What the lab's dom0 scenarios share (scenario.sh, scenario-backends.sh): sourced by
# them in dom0 as /lab/lab-lib.sh, after /lab/params. boot.sh copies it into every run's
# directory next to the scenario, so a scenario always gets the lib of the same checkout.
#
# Globals a scenario reads or sets: status (the scenario's exit status: set on a failure,
# the run goes on), n and name (guests created, the last one's name), tapkit (the pid of
# the last `serve`). Settings from /lab/params used here:
#   XENLAB_MKFS=1 / XENLAB_BENCH=1   passed to the guest (domu-init.sh) on its command line
#   XENLAB_GUEST_TIMEOUT=600         seconds a guest may run before it is destroyed
#   XENLAB_GRANTS=auto|copy|map      tapkit's --grant-access
#   XENLAB_TRACE=1                   TAPKIT_XEN_TRACE: every grant and event-channel call logged
#   XENLAB_CORE=1                    tapkit may dump core (to /lab/core.PID)
#   XENLAB_PROFILE=1                 tapkit under `node --cpu-prof`, profiles in /lab/prof
#   XENLAB_STRACE=1                  tapkit under `strace -c -f` (needs /lab/strace, see
#                                    bench/xenlab-seqread.sh), the summary in LOG.strace
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
export UV_THREADPOOL_SIZE=8
say() { echo "XENLAB-SCENARIO [$(cut -d' ' -f1 /proc/uptime)] $*"; }
status=0
n=0
name=
tapkit=
grants=${XENLAB_GRANTS:-auto}
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

# create_domu WAY IMAGE DISK-LIST [CFG-LINES] [KERNEL-ARGS]: writes the guest's config
# (DISK-LIST is what goes between the brackets of `disk = [ ]`, quotes included) and runs
# `xl create`; sets $name. Fails (status 14) when xl create does.
create_domu() {
  local way=$1 image=$2 disk=$3 cfg=${4:-} extra="console=hvc0 quiet ${5:-}" start
  [ "${XENLAB_MKFS:-0}" = 1 ] && extra="$extra xenlab_mkfs=1"
  [ "${XENLAB_BENCH:-0}" = 1 ] && extra="$extra xenlab_bench=1"
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

# cpu_busy: dom0's busy CPU time so far (all its vCPUs: user, nice, system, irq, softirq),
# in clock ticks (USER_HZ, 100 a second).
cpu_busy() { awk '/^cpu /{ print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }

# cpu_of PID: the process's user and system CPU time so far, in seconds.
cpu_of() { awk '{ printf "user %.2f s, system %.2f s", $14 / 100, $15 / 100 }' "/proc/$1/stat" 2>/dev/null; }

# wait_domu WAY IMAGE: until guest $name is gone (destroyed, with diagnostics, after
# $guest_timeout s), then its console to /lab/console-WAY-IMAGE.log. Says how much CPU
# dom0 used meanwhile (the backend's work, whichever it is, and the toolstack's).
wait_domu() {
  local way=$1 image=$2 i=0 start busy
  start=$(date +%s)
  busy=$(cpu_busy)
  while xl list $name >/dev/null 2>&1; do
    [ $i -ge $((guest_timeout * 2)) ] && { say "$way $image: $name still running after $guest_timeout s"; diagnose "$name"; xl destroy $name; status=17; break; }
    sleep 0.5; i=$((i+1))
  done
  say "$way $image: $name gone after $(( $(date +%s) - start )) s; dom0 CPU busy $(awk -v a="$busy" -v b="$(cpu_busy)" 'BEGIN { printf "%.2f", (b - a) / 100 }') s"
  cp /var/log/xen/console/guest-$name.log "/lab/console-$way-$image.log" 2>/dev/null
  grep XENLAB-DOMU "/lab/console-$way-$image.log"
  grep -q XENLAB-DOMU-DONE "/lab/console-$way-$image.log" || status=16
}

# serve TYPE LOG: `tapkit xen serve` on backend/TYPE in the background, its output to LOG
# (and the console); returns once it serves, sets $tapkit. The scenario ends (exit 11-13)
# when it cannot start: nothing after it could pass.
serve() {
  local type=$1 log=$2 i=0
  local -a run=(tapkit)
  if [ "$type" = vbd ] && lsmod | grep -q xen_blkback; then say "xen-blkback is loaded: it would take backend/vbd"; exit 11; fi
  if [ "${XENLAB_CORE:-0}" = 1 ]; then ulimit -c unlimited; echo '/lab/core.%p' > /proc/sys/kernel/core_pattern; fi
  [ "${XENLAB_PROFILE:-0}" = 1 ] && { mkdir -p /lab/prof; run=(/opt/node --cpu-prof --cpu-prof-dir=/lab/prof /opt/tapkit/dist/core/cli/main.js); }
  # strace's -c summary of the process and its threads (strace itself is $tapkit then).
  [ "${XENLAB_STRACE:-0}" = 1 ] && run=(env LD_LIBRARY_PATH=/lab/strace-lib /lab/strace -c -f -o "$log.strace" "${run[@]}")
  TAPKIT_XEN_TRACE=${XENLAB_TRACE:-0} "${run[@]}" xen serve --platform xen --backend-type "$type" --grant-access "$grants" > >(tee "$log") 2>&1 &
  tapkit=$!
  until grep -q 'tapkit xen: serving' "$log" 2>/dev/null; do
    kill -0 $tapkit 2>/dev/null || { say "tapkit ($type) exited"; exit 12; }
    [ $i -ge 900 ] && { say "tapkit ($type) did not start in 180 s"; kill $tapkit; exit 13; }
    sleep 0.2; i=$((i+1))
  done
  say "tapkit serving backend/$type (data: $grants)"
}

# stop PID WHAT: SIGTERM, then SIGKILL (status 18) if it has not exited in 30 s. Under
# XENLAB_STRACE the SIGTERM goes to strace's child (strace itself would only detach).
stop() {
  local i=0 target=$1
  [ "${XENLAB_STRACE:-0}" = 1 ] && target=$(pgrep -P "$1" | head -n 1)
  kill -TERM "${target:-$1}"
  while kill -0 "$1" 2>/dev/null && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done
  kill -0 "$1" 2>/dev/null && { say "$2 did not exit on SIGTERM"; kill -KILL "$1"; status=18; }
  wait "$1"; say "$2 exit status $?"
}

# wait_ended LOG COUNT: until tapkit logged COUNT devices ended (it closed their images; the
# toolstack removes a vbd with its domain), at most 30 s.
wait_ended() {
  local i=0
  until [ "$(grep -c ': ended' "$1")" -ge "$2" ] || [ $i -ge 150 ]; do sleep 0.2; i=$((i+1)); done
}

# image_in IMAGE: /lab/IMAGE copied to /tmp (tmpfs) for a guest to use (status 10 on failure).
image_in() {
  cp "/lab/$1" "/tmp/$1" || { status=10; return 1; }
}

# image_out WAY IMAGE: the image handed back to the host as /lab/out-WAY-IMAGE.
image_out() {
  cp "/tmp/$2" "/lab/out-$1-$2" || status=15
  rm -f "/tmp/$2"
}

# direct_ring WAY LOG IMAGE...: `tapkit xen serve` on backend/vbd (its output to LOG), then
# for each image a guest through `xl create` (the no-op hotplug script lets libxl take a
# regular file as the phy target; tapkit opens the vbd's params as a tapkit spec, the
# format probed); each image handed back once tapkit has closed it; tapkit stopped.
direct_ring() {
  local way=$1 log=$2 image ended=0
  shift 2
  # tapkit watches backend/vbd before xl create (libxl gives the backend 10 s for InitWait).
  serve vbd "$log"
  for image in "$@"; do
    image_in "$image" || continue
    create_domu "$way" "$image" "\"format=raw, vdev=xvda, access=rw, backendtype=phy, script=/etc/xen/scripts/block-noop, target=/tmp/$image\"" && wait_domu "$way" "$image"
    ended=$((ended+1)); wait_ended "$log" $ended
    image_out "$way" "$image"
  done
  say "tapkit xen serve ($way) CPU: $(cpu_of $tapkit)"
  stop $tapkit "tapkit xen serve ($way)"
}
