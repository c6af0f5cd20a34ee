#!/usr/bin/env bash
# Remote-disk benchmark: one 1 GiB object on nginx (tmpfs), served over NBD by
#   tapkit-http   `tapkit serve http://127.0.0.1:PORT/disk.raw --socket S`
#   nbdkit-curl   `nbdkit curl url=http://127.0.0.1:PORT/disk.raw`
# and read by the same client, fio's nbd engine (libnbd):
#   seqread  sequential 1 MiB reads, queue depth 8
#   rr32     random 4 KiB reads, queue depth 32
# Method (see /work/shared/reference/bench-method.md): server and nginx pinned to CPU 1,
# client to CPU 0; rounds outermost, servers alternating inside a round; each round's
# tapkit ÷ nbdkit ratio printed (paired), with medians, ranges, server CPU and the CPU
# other processes used meanwhile. Not run by the tests.
#
#   bash bench/http/run.sh                 # REPS=3 RUNTIME=10 by default
#   REPS=5 RUNTIME=20 SERVERS="tapkit-http nbdkit-curl" bash bench/http/run.sh
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-10}
SERVERS=${SERVERS:-"tapkit-http nbdkit-curl"}
TESTS=${TESTS:-"seqread rr32"}
# Extra http options for tapkit, e.g. TAPKIT_SPEC_OPTS=",connections=16,readahead=16M".
TAPKIT_SPEC_OPTS=${TAPKIT_SPEC_OPTS:-}
SIZE=$((1 << 30))
DATA=${DATA:-/dev/shm/tapkit-bench-http}
RUN=$(mktemp -d /tmp/tapkit-bench-http.XXXXXX)
OUT=${OUT:-$RUN/out}
CSV=$OUT/results.csv
SRV_CPU=(taskset -c 1)
CLI_CPU=(taskset -c 0)
CLK_TCK=$(getconf CLK_TCK)

mkdir -p "$DATA" "$OUT"
echo "test,server,rep,metric,value" >"$CSV"

SERVER_PID="" NGINX_PID=""
stop_pid() {
  local pid=$1
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  stop_pid "$SERVER_PID"; SERVER_PID=""
  stop_pid "$NGINX_PID"; NGINX_PID=""
  [[ ${KEEP_DATA:-0} == 1 ]] || rm -rf "$DATA"
  echo "results: $CSV" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

for tool in nginx nbdkit fio nbdinfo taskset python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
nbdkit curl --version >/dev/null 2>&1 || { echo "nbdkit's curl plugin is missing (nbdkit-plugin-curl)" >&2; exit 1; }
[[ -f $ROOT/dist/core/cli/main.js ]] || (cd "$ROOT" && npm run build --silent)

if [[ ! -s $DATA/disk.raw ]]; then
  log "making 1 GiB of random data in $DATA"
  dd if=/dev/urandom of="$DATA/disk.raw" bs=1M count=1024 status=none
fi

start_nginx() {
  local port conf=$RUN/nginx.conf
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mkdir -p "$RUN/nginx"
  cat >"$conf" <<CONF
user root;
worker_processes 1;
pid $RUN/nginx/nginx.pid;
error_log $RUN/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $RUN/nginx/body;
  proxy_temp_path $RUN/nginx/proxy;
  fastcgi_temp_path $RUN/nginx/fastcgi;
  uwsgi_temp_path $RUN/nginx/uwsgi;
  scgi_temp_path $RUN/nginx/scgi;
  sendfile on;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$port; root $DATA; }
}
CONF
  "${SRV_CPU[@]}" nginx -c "$conf" -p "$RUN/nginx" -g 'daemon off;' &
  NGINX_PID=$!
  for _ in $(seq 100); do
    curl -sfI "http://127.0.0.1:$port/disk.raw" >/dev/null 2>&1 && { URL="http://127.0.0.1:$port/disk.raw"; return 0; }
    sleep 0.1
  done
  echo "nginx did not come up: $(cat "$RUN/nginx/error.log")" >&2; exit 1
}

start_server() {
  local name=$1
  SOCK=$RUN/$name.sock; URI="nbd+unix:///?socket=$SOCK"
  rm -f "$SOCK"
  case $name in
    tapkit-http) "${SRV_CPU[@]}" node "$ROOT/dist/core/cli/main.js" serve "http$TAPKIT_SPEC_OPTS:$URL" --socket "$SOCK" 2>"$RUN/$name.err" & ;;
    nbdkit-curl) "${SRV_CPU[@]}" nbdkit -f --exit-with-parent -r -U "$SOCK" curl url="$URL" 2>"$RUN/$name.err" & ;;
    *) echo "unknown server $name" >&2; return 1 ;;
  esac
  SERVER_PID=$!
  for _ in $(seq 150); do
    if [[ -S $SOCK ]] && timeout 5 nbdinfo --size "$URI" >/dev/null 2>&1; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server $name died at start: $(cat "$RUN/$name.err")" >&2; SERVER_PID=""; return 1; }
    sleep 0.1
  done
  echo "server $name did not come up" >&2; return 1
}

pid_ticks() { # user+system ticks of a process
  local s; s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  s=${s##*) }; set -- $s; echo $(( ${12} + ${13} ))
}
tree_ticks() { # a process and its children (nginx's master and worker)
  local total=0 pid
  for pid in $1 $(pgrep -P "$1" 2>/dev/null); do total=$(( total + $(pid_ticks "$pid") )); done
  echo $total
}
sys_busy() { local a; read -r -a a </proc/stat; echo $(( a[1] + a[2] + a[3] )); }

fio_job() { # TEST SERVER REP RW BS QD
  local test=$1 srv=$2 rep=$3 rw=$4 bs=$5 qd=$6 json=$OUT/fio-$2-$1-r$3.json
  local t0 t1 s0 s1 n0 n1 b0 b1
  b0=$(sys_busy); s0=$(pid_ticks "$SERVER_PID"); n0=$(tree_ticks "$NGINX_PID"); t0=$EPOCHREALTIME
  timeout $((RUNTIME + 60)) "${CLI_CPU[@]}" fio --name="$test" --ioengine=nbd --uri="$URI" --rw="$rw" --bs="$bs" \
    --iodepth="$qd" --thread --size=$SIZE --norandommap --randrepeat=0 --group_reporting \
    --time_based --runtime="$RUNTIME" --ramp_time=1 --output-format=json --output="$json" >/dev/null
  t1=$EPOCHREALTIME; s1=$(pid_ticks "$SERVER_PID"); n1=$(tree_ticks "$NGINX_PID"); b1=$(sys_busy)
  python3 - "$json" "$test" "$srv" "$rep" "$CSV" "$((s1 - s0))" "$((n1 - n0))" "$((b1 - b0))" "$CLK_TCK" "$t0" "$t1" <<'PY'
import json, sys
path, test, srv, rep, csv, srv_ticks, nginx_ticks, busy_ticks, tck, t0, t1 = sys.argv[1:]
text = open(path).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
read = job["read"]
secs = float(t1) - float(t0)
srv_cpu = 100 * int(srv_ticks) / int(tck) / secs
nginx_cpu = 100 * int(nginx_ticks) / int(tck) / secs
client_cpu = job["usr_cpu"] + job["sys_cpu"]
# What neither the server, nginx nor the client used: other helpers' builds and tests.
foreign = max(0.0, 100 * int(busy_ticks) / int(tck) / secs - srv_cpu - nginx_cpu - client_cpu)
rows = {"MiB/s": read["bw_bytes"] / 2**20, "IOPS": read["iops"], "lat_mean_us": read["lat_ns"]["mean"] / 1000,
        "server_cpu": srv_cpu, "nginx_cpu": nginx_cpu, "foreign_cpu": foreign}
with open(csv, "a") as f:
    for k, v in rows.items():
        f.write(f"{test},{srv},{rep},{k},{v:.2f}\n")
print(f"  {test:8s} {srv:12s} r{rep}: {rows['MiB/s']:8.1f} MiB/s {rows['IOPS']:9.0f} IOPS  lat {rows['lat_mean_us']:8.1f} us"
      f"  server cpu {srv_cpu:4.0f}%  nginx {nginx_cpu:4.0f}%  others {foreign:4.0f}%", file=sys.stderr)
PY
}

log "placement: server and nginx on CPU 1, fio on CPU 0; $REPS rounds of ${RUNTIME}s"
start_nginx
log "nginx serving $URL"
for rep in $(seq "$REPS"); do
  # Alternate which server goes first, so neither always meets a warmer machine.
  order=($SERVERS); (( rep % 2 == 0 )) && order=($(printf '%s\n' "${order[@]}" | tac))
  for srv in "${order[@]}"; do
    if ! start_server "$srv"; then log "  $srv could not be started; no numbers for it this round"; continue; fi
    for test in $TESTS; do
      case $test in
        seqread) fio_job seqread "$srv" "$rep" read 1M 8 ;;
        rr32)    fio_job rr32 "$srv" "$rep" randread 4k 32 ;;
      esac
    done
    stop_pid "$SERVER_PID"; SERVER_PID=""
  done
done

python3 "$HERE/summarize.py" "$CSV" tapkit-http nbdkit-curl
