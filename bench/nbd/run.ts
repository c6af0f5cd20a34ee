/**
 * NBD benchmark: tapkit against nbdkit and qemu-nbd, one client (fio's nbd engine) for all.
 *
 *   npm run build && node dist/bench/nbd/run.js
 *   ROUNDS=3 RUNTIME=8 ONLY='rr32|seqread' SERVERS='tapkit-memory,nbdkit-memory' node dist/bench/nbd/run.js
 *
 * Method (/work/shared/reference/bench-method.md): every server gets the same 1 GiB of
 * random bytes (memory servers are filled untimed with nbdcopy); the server is pinned to
 * CPU 1 and the client to CPU 0 (PIN=0 to disable); rounds are the outer loop, so
 * drift hits every server alike; each cell prints min / median / max, and each tapkit
 * cell its paired ratio to a peer (round r of tapkit over round r of the peer).
 * Every measurement first waits (bounded: QUIET_WAIT seconds, QUIET_BUDGET in all) until
 * the rest of the machine uses less than QUIET_MAX % of a CPU, then records the server's
 * CPU (cost per GiB and per request), the client's CPU, the CPU used by everything else
 * ("others") and the hypervisor's steal: a cell with a busy neighbour is flagged, not
 * silently trusted.
 *
 * Environment: ROUNDS (3; REPS is its deprecated alias), RUNTIME (8 s per fio job, plus
 * 1 s ramp), PIN (1: server CPU 1, client CPU 0; same: both CPU 0; 0: unpinned), ONLY
 * (regex on "server/workload"), SERVERS (comma list), WORKDIR (where the 1 GiB images
 * live: a fresh directory on /dev/shm by default), KEEP=1 (keep WORKDIR, and with it the
 * random source image for the next run given the same WORKDIR), OUT (results directory),
 * QUIET_MAX (15), QUIET_WAIT (60), QUIET_BUDGET (900).
 *
 * Not a test: nothing here asserts speed.
 */
import { type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { benchWorkdir, CLK_TCK, machineTicks, median, placement, processTicks, recordRatios, roundsFromEnv, run as must, startNbdServer, stopProcess, waitQuiet } from '../lib';

const ROUNDS = roundsFromEnv();
const RUNTIME = Number(process.env.RUNTIME ?? 8);
const PIN = process.env.PIN ?? '1';
const ONLY = process.env.ONLY ? new RegExp(process.env.ONLY) : undefined;
const SERVER_FILTER = process.env.SERVERS?.split(',');
// Removed at exit (an interrupted run too) unless KEEP is set: a gigabyte of tmpfs must not outlive the bench.
const DATA_DIR = benchWorkdir('nbd');
const OUT = process.env.OUT ?? fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-nbdbench-'));
const SIZE = 1 << 30;
const CLI = path.resolve(__dirname, '../../core/cli/main.js');

const { server: serverCpu, client: clientCpu } = placement(PIN);

interface ServerDef {
  id: string;
  /** Command line, given the socket path and the image path. */
  command(socket: string, image: string): string[];
  /** Filled with the image through nbdcopy before measuring (memory servers). */
  fill: boolean;
  tapkit: boolean;
}

const SERVERS: ServerDef[] = [
  { id: 'tapkit-memory', command: (s) => [process.execPath, CLI, 'serve', '--quiet', '--socket', s, 'memory:1G'], fill: true, tapkit: true },
  { id: 'tapkit-raw', command: (s, img) => [process.execPath, CLI, 'serve', '--quiet', '--socket', s, `raw:${img}`], fill: false, tapkit: true },
  { id: 'nbdkit-memory', command: (s) => ['nbdkit', '-f', '--exit-with-parent', '-U', s, 'memory', 'size=1G'], fill: true, tapkit: false },
  { id: 'nbdkit-file', command: (s, img) => ['nbdkit', '-f', '--exit-with-parent', '-U', s, 'file', img], fill: false, tapkit: false },
  { id: 'qemu-nbd-raw', command: (s, img) => ['qemu-nbd', '-t', '-e', '8', '-k', s, '-f', 'raw', img], fill: false, tapkit: false },
];

/** Which peer each tapkit server is compared with (same kind of storage), plus nbdkit memory. */
const PEERS: Record<string, string[]> = {
  'tapkit-memory': ['nbdkit-memory'],
  'tapkit-raw': ['nbdkit-file', 'qemu-nbd-raw', 'nbdkit-memory'],
};

interface Workload {
  id: string;
  rw: string;
  bs: string;
  iodepth: number;
  /** Reported in MiB/s (throughput) or IOPS. */
  unit: 'MiB/s' | 'IOPS';
  /** Bytes per request, for CPU-µs per request. */
  bytes: number;
}

const WORKLOADS: Workload[] = [
  { id: 'seqread', rw: 'read', bs: '1M', iodepth: 8, unit: 'MiB/s', bytes: 1 << 20 },
  { id: 'rr1', rw: 'randread', bs: '4k', iodepth: 1, unit: 'IOPS', bytes: 4096 },
  { id: 'rr32', rw: 'randread', bs: '4k', iodepth: 32, unit: 'IOPS', bytes: 4096 },
  { id: 'seqwrite', rw: 'write', bs: '1M', iodepth: 8, unit: 'MiB/s', bytes: 1 << 20 },
  { id: 'rw32', rw: 'randwrite', bs: '4k', iodepth: 32, unit: 'IOPS', bytes: 4096 },
];

interface Sample {
  server: string;
  workload: string;
  rep: number;
  value: number;
  /** Server CPU, % of one CPU over the job. */
  serverCpu: number;
  /** Server CPU-seconds per GiB moved and CPU-µs per request. */
  cpuPerGiB: number;
  cpuUsPerRequest: number;
  /** Client (fio) CPU, % of one CPU. */
  clientCpu: number;
  /** CPU used by everything but this server and the client, % of one CPU. */
  others: number;
  /** CPU the hypervisor gave to other guests, % of one CPU. */
  steal: number;
}

type Measurement = Omit<Sample, 'server' | 'workload' | 'rep'>;

// ---- process hygiene ----------------------------------------------------------------

let running: ChildProcess | undefined;
function stopServer(): void {
  if (running) stopProcess(running);
  running = undefined;
}

function startServer(def: ServerDef, socket: string, image: string): void {
  running = startNbdServer(def.id, [...serverCpu, ...def.command(socket, image)], socket);
  const uri = uriOf(socket);
  if (def.fill) must(['nbdcopy', '--flush', image, uri], 300);
}

function uriOf(socket: string): string {
  return `nbd+unix:///?socket=${socket}`;
}

// ---- one measurement ----------------------------------------------------------------

function runFio(workload: Workload, socket: string, pid: number): Measurement {
  const args = [
    ...clientCpu, 'fio', '--name=bench', '--ioengine=nbd', `--uri=${uriOf(socket)}`, `--rw=${workload.rw}`, `--bs=${workload.bs}`,
    `--iodepth=${workload.iodepth}`, '--thread', '--norandommap', '--randrepeat=0', '--time_based', `--runtime=${RUNTIME}`,
    '--ramp_time=1', `--size=${SIZE}`, '--output-format=json',
  ];
  waitQuiet([pid]);
  const machine0 = machineTicks();
  const server0 = processTicks(pid);
  const client0 = processTicks('self', true);
  const t0 = process.hrtime.bigint();
  const out = must(args, RUNTIME + 60);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const serverTicks = processTicks(pid) - server0;
  const clientTicks = processTicks('self', true) - client0;
  const machine1 = machineTicks();
  // The nbd engine prints a line before the JSON.
  const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
  const side = workload.rw.includes('write') ? job.write : job.read;
  const value = workload.unit === 'IOPS' ? side.iops : side.bw_bytes / 2 ** 20;
  const pct = (ticks: number) => (100 * ticks) / CLK_TCK / seconds;
  // CPU cost over the whole job (ramp included) against the bytes moved in the measured part,
  // scaled to the job's length.
  const serverSeconds = serverTicks / CLK_TCK;
  const bytes = side.bw_bytes * seconds;
  return {
    value,
    serverCpu: pct(serverTicks),
    cpuPerGiB: bytes > 0 ? serverSeconds / (bytes / 2 ** 30) : 0,
    cpuUsPerRequest: bytes > 0 ? (1e6 * serverSeconds) / (bytes / workload.bytes) : 0,
    clientCpu: pct(clientTicks),
    others: Math.max(0, pct(machine1.busy - machine0.busy - serverTicks - clientTicks)),
    steal: pct(machine1.steal - machine0.steal),
  };
}

// ---- report -------------------------------------------------------------------------

function fmt(value: number, unit: Workload['unit']): string {
  return unit === 'IOPS' ? Math.round(value).toLocaleString('en-US') : value.toFixed(0);
}

/** Server CPU cost in the unit that suits the workload: s/GiB for throughput, µs/request for IOPS. */
function cost(x: Sample, w: Workload): number {
  return w.unit === 'IOPS' ? x.cpuUsPerRequest : x.cpuPerGiB;
}

function costUnit(w: Workload): string {
  return w.unit === 'IOPS' ? 'µs/req' : 's/GiB';
}

/** Paired ratios mine/peer of `pick`, one per repetition where both were measured. */
function pairedRatios(samples: Sample[], mine: string, peer: string, w: Workload, pick: (x: Sample) => number): number[] {
  const ratios: number[] = [];
  for (let rep = 0; rep < ROUNDS; rep++) {
    const a = samples.find((x) => x.server === mine && x.workload === w.id && x.rep === rep);
    const b = samples.find((x) => x.server === peer && x.workload === w.id && x.rep === rep);
    if (a && b && pick(b) > 0) ratios.push(pick(a) / pick(b));
  }
  return ratios;
}

function ratioCell(ratios: number[]): string {
  if (ratios.length === 0) return '–';
  return `**${median(ratios).toFixed(2)}** [${Math.min(...ratios).toFixed(2)}–${Math.max(...ratios).toFixed(2)}]`;
}

/** The issue's targets: tapkit memory against nbdkit memory. */
const TARGETS = [
  { workload: 'seqread', mine: 'tapkit-memory', peer: 'nbdkit-memory', atLeast: 0.8 },
  { workload: 'rr32', mine: 'tapkit-memory', peer: 'nbdkit-memory', atLeast: 0.6 },
];

function report(samples: Sample[], servers: ServerDef[], workloads: Workload[]): string {
  const lines: string[] = [];
  lines.push(`| server | ${workloads.map((w) => `${w.id} (${w.rw} ${w.bs} QD${w.iodepth}, ${w.unit})`).join(' | ')} |`);
  lines.push(`|---|${workloads.map(() => '---').join('|')}|`);
  for (const s of servers) {
    const cells = workloads.map((w) => {
      const mine = samples.filter((x) => x.server === s.id && x.workload === w.id);
      if (mine.length === 0) return '–';
      const values = mine.map((x) => x.value);
      const busy = Math.max(...mine.map((x) => x.others));
      const cpu = median(mine.map((x) => cost(x, w)));
      return `${fmt(Math.min(...values), w.unit)} / **${fmt(median(values), w.unit)}** / ${fmt(Math.max(...values), w.unit)} (${cpu.toFixed(w.unit === 'IOPS' ? 1 : 2)} ${costUnit(w)})${busy > 20 ? ` ⚠${busy.toFixed(0)}%` : ''}`;
    });
    lines.push(`| ${s.id} | ${cells.join(' | ')} |`);
  }
  const pairs = Object.entries(PEERS).flatMap(([mine, peers]) => peers.map((peer) => [mine, peer] as const))
    .filter(([mine, peer]) => servers.some((s) => s.id === mine) && servers.some((s) => s.id === peer));
  lines.push('');
  lines.push('Paired speed ratios (tapkit / peer within each repetition; median [min–max], above 1 = tapkit faster):');
  lines.push('');
  lines.push(`| ratio | ${workloads.map((w) => w.id).join(' | ')} |`);
  lines.push(`|---|${workloads.map(() => '---').join('|')}|`);
  for (const [mine, peer] of pairs) {
    lines.push(`| ${mine} / ${peer} | ${workloads.map((w) => ratioCell(pairedRatios(samples, mine, peer, w, (x) => x.value))).join(' | ')} |`);
    for (const w of workloads) {
      const cell = samples.filter((x) => (x.server === mine || x.server === peer) && x.workload === w.id);
      if (cell.length === 0) continue;
      const target = TARGETS.find((t) => t.workload === w.id && t.mine === mine && t.peer === peer);
      recordRatios({
        bench: 'nbd', pair: `${mine} / ${peer}`, workload: `${w.id} (${w.rw} ${w.bs} QD${w.iodepth}, ${w.unit})`, ratios: pairedRatios(samples, mine, peer, w, (x) => x.value),
        maxForeignPct: Math.max(...cell.map((x) => x.others)), target: target ? `>= ${target.atLeast}` : undefined,
      });
    }
  }
  lines.push('');
  lines.push('Paired server CPU cost ratios (tapkit / peer, per GiB or per request; below 1 = tapkit cheaper):');
  lines.push('');
  lines.push(`| ratio | ${workloads.map((w) => w.id).join(' | ')} |`);
  lines.push(`|---|${workloads.map(() => '---').join('|')}|`);
  for (const [mine, peer] of pairs) {
    lines.push(`| ${mine} / ${peer} | ${workloads.map((w) => ratioCell(pairedRatios(samples, mine, peer, w, (x) => cost(x, w)))).join(' | ')} |`);
  }
  lines.push('');
  for (const target of TARGETS) {
    const w = workloads.find((x) => x.id === target.workload);
    const ratios = w ? pairedRatios(samples, target.mine, target.peer, w, (x) => x.value) : [];
    if (ratios.length === 0) continue;
    const got = median(ratios);
    lines.push(`Target ${target.workload} ${target.mine} / ${target.peer} >= ${target.atLeast}: ${got.toFixed(2)} (${got >= target.atLeast ? 'met' : 'NOT met'})`);
  }
  lines.push('');
  lines.push('Cells: min / **median** / max over repetitions, then the median server CPU cost;');
  lines.push('⚠N% = in some repetition other processes used N% of a CPU during the measurement (re-measure those).');
  return lines.join('\n');
}

function machine(): string {
  const cpu = os.cpus()[0]?.model ?? 'unknown CPU';
  const versions = [
    `node ${process.version}`,
    must(['nbdkit', '--version'], 10).trim(),
    must(['qemu-nbd', '--version'], 10).split('\n')[0].trim(),
    must(['fio', '--version'], 10).trim(),
  ];
  return `${os.cpus().length} × ${cpu}, ${(os.totalmem() / 2 ** 30).toFixed(1)} GiB RAM, Linux ${os.release()}; ${versions.join(', ')}; PIN=${PIN} (server CPU ${serverCpu[2] ?? 'any'}, fio CPU ${clientCpu[2] ?? 'any'}), ROUNDS=${ROUNDS}, RUNTIME=${RUNTIME}s`;
}

// ---- main ---------------------------------------------------------------------------

function main(): void {
  if (!fs.existsSync(CLI)) throw new Error(`build first (npm run build): ${CLI} is missing`);
  const image = path.join(DATA_DIR, 'disk.raw');
  const source = path.join(DATA_DIR, 'source.raw');
  if (!fs.existsSync(source) || fs.statSync(source).size !== SIZE) {
    process.stderr.write(`making ${source} (1 GiB of random bytes)\n`);
    must(['dd', 'if=/dev/urandom', `of=${source}`, 'bs=1M', `count=${SIZE >> 20}`, 'status=none'], 300);
  }
  const runDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-nbdbench-run-'));
  const servers = SERVERS.filter((s) => !SERVER_FILTER || SERVER_FILTER.includes(s.id));
  const workloads = WORKLOADS;
  const samples: Sample[] = [];
  const csv = path.join(OUT, 'results.csv');
  fs.writeFileSync(csv, 'server,workload,rep,value,unit,server_cpu_pct,server_cpu_s_per_gib,server_cpu_us_per_req,client_cpu_pct,others_cpu_pct,steal_pct\n');
  process.stderr.write(`machine: ${machine()}\nresults: ${csv}\n`);
  try {
    for (let rep = 0; rep < ROUNDS; rep++) {
      for (const def of servers) {
        // File servers read the pristine bytes each round (writes of the last one are undone).
        if (!def.fill) fs.copyFileSync(source, image);
        const socket = path.join(runDir, `${def.id}.sock`);
        startServer(def, socket, def.fill ? source : image);
        try {
          for (const w of workloads) {
            if (ONLY && !ONLY.test(`${def.id}/${w.id}`)) continue;
            const r = runFio(w, socket, running!.pid!);
            samples.push({ server: def.id, workload: w.id, rep, ...r });
            const row = [def.id, w.id, rep, r.value.toFixed(1), w.unit, r.serverCpu.toFixed(1), r.cpuPerGiB.toFixed(3), r.cpuUsPerRequest.toFixed(2), r.clientCpu.toFixed(1), r.others.toFixed(1), r.steal.toFixed(1)];
            fs.appendFileSync(csv, `${row.join(',')}\n`);
            process.stderr.write(
              `round ${rep + 1}/${ROUNDS} ${def.id.padEnd(14)} ${w.id.padEnd(9)} ${fmt(r.value, w.unit).padStart(9)} ${w.unit.padEnd(5)} ` +
                `srv ${r.serverCpu.toFixed(0)}% (${r.cpuPerGiB.toFixed(2)} s/GiB, ${r.cpuUsPerRequest.toFixed(1)} µs/req) fio ${r.clientCpu.toFixed(0)}% others ${r.others.toFixed(0)}% steal ${r.steal.toFixed(0)}%\n`,
            );
          }
        } finally {
          stopServer();
        }
      }
    }
  } finally {
    fs.rmSync(runDir, { recursive: true, force: true });
    // Even a run that failed half-way reports what it measured.
    const table = `Machine: ${machine()}\n\n${report(samples, servers, workloads.filter((w) => !ONLY || servers.some((s) => ONLY.test(`${s.id}/${w.id}`))))}\n`;
    fs.writeFileSync(path.join(OUT, 'summary.md'), table);
    process.stdout.write(table);
  }
}

main();
