/**
 * blkif ring benchmark: the sim ring driven by the C frontend (test/xen/frontend.c, its
 * `bench` scenario) against the same workload over tapkit's NBD export driven by fio's
 * nbd engine, both on a filled memory VBD.
 *
 *   npm run build && node dist/bench/xen/run.js
 *   ROUNDS=5 COUNT_4K=300000 COUNT_1M=6000 node dist/bench/xen/run.js
 *
 * Workloads: 4 KiB random reads at QD32 (direct requests), 1 MiB sequential reads at QD8
 * (indirect requests of 256 segments on the ring). Method (bench-method.md): server on
 * CPU 1, client on CPU 0 (PIN=0 disables), repetitions outermost so drift hits both paths
 * alike, min/median/max per cell and the paired ratio ring ÷ NBD per repetition, server
 * CPU per request, and the CPU used by everything else during the cell ("others").
 *
 * Caveats printed with the results: the two clients differ (a C program on the ring,
 * fio+libnbd on NBD); the ring client counts requests, fio runs for RUNTIME seconds.
 *
 * Environment: ROUNDS (3; REPS is its deprecated alias), RUNTIME (8, fio seconds), COUNT_4K (200000), COUNT_1M (4000),
 * PIN (1), OUT (results directory), SIZE_MIB (512, the memory VBD), TMPFS (/dev/shm). Not a test: nothing here asserts speed.
 */
import { execFileSync, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { median, onExit, placement, recordRatios, roundsFromEnv, startCpuMeter, startProcess, stopProcess as stop, waitQuiet, waitUntil } from '../lib';

const ROUNDS = roundsFromEnv();
const RUNTIME = Number(process.env.RUNTIME ?? 8);
const PIN = process.env.PIN ?? '1';
const COUNT_4K = Number(process.env.COUNT_4K ?? 200_000);
const COUNT_1M = Number(process.env.COUNT_1M ?? 4000);
const OUT = process.env.OUT ?? fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-xenbench-'));
const REPO = path.resolve(__dirname, '../../..');
const CLI = path.join(REPO, 'dist/core/cli/main.js');
const SIZE_MIB = Number(process.env.SIZE_MIB ?? 512);
const IMAGE = path.join(process.env.TMPFS ?? '/dev/shm', `tapkit-xenbench-${process.pid}.img`);
/**
 * A memory VBD, filled (untimed) before each measurement: through the ring by the C
 * frontend's `fill` scenario, through NBD by nbdcopy from a file of random bytes on tmpfs
 * (a memory VBD never written would let NBD answer reads as holes, moving no data).
 */
const SPEC = `memory:${SIZE_MIB}M`;
const DOMID = 5;
const DEVID = 51712;

const { server: serverCpu, client: clientCpu } = placement(PIN);

interface Workload {
  id: string;
  bs: number;
  qd: number;
  random: boolean;
  count: number;
  unit: 'IOPS' | 'MiB/s';
}

const WORKLOADS: Workload[] = [
  { id: 'rr32-4k', bs: 4096, qd: 32, random: true, count: COUNT_4K, unit: 'IOPS' },
  { id: 'seq-1m-qd8', bs: 1 << 20, qd: 8, random: false, count: COUNT_1M, unit: 'MiB/s' },
];

interface Sample {
  value: number;
  cpuUsPerRequest: number;
  others: number;
}

onExit(() => fs.rmSync(IMAGE, { force: true }));

function start(cmd: string[]): ChildProcess {
  return startProcess(cmd);
}

/** Runs `client`, measuring the server's CPU and everything else's around it. */
function measure(serverPid: number, client: string[], requests: (out: string) => number, parse: (out: string) => number): Sample {
  waitQuiet([serverPid]);
  const meter = startCpuMeter([serverPid]);
  const r = spawnSync(client[0], client.slice(1), { encoding: 'utf8', timeout: 600_000, maxBuffer: 64 << 20 });
  const cpu = meter();
  if (r.status !== 0) throw new Error(`${client.join(' ')} failed: ${r.stdout}${r.stderr}`);
  return { value: parse(r.stdout), cpuUsPerRequest: (1e6 * cpu.serverSeconds) / requests(r.stdout), others: cpu.foreignPct };
}

// ---- the ring -------------------------------------------------------------------------

function frontendBinary(): string {
  const out = path.join(OUT, 'frontend');
  execFileSync('gcc', ['-O2', '-o', out, path.join(REPO, 'test/xen/frontend.c'), '-lxenstore']);
  return out;
}

function ringSample(frontend: string, w: Workload): Sample {
  const dir = fs.mkdtempSync(path.join(OUT, 'sim-'));
  const server = start([...serverCpu, process.execPath, CLI, 'xen', 'serve', '--quiet', '--platform', `sim:${dir}`]);
  try {
    waitUntil('tapkit xen serve', () => fs.existsSync(path.join(dir, 'evtchn.sock')), 30, server);
    execFileSync(process.execPath, [CLI, 'xen', 'attach', '--platform', `sim:${dir}`, '--domid', String(DOMID), '--devid', String(DEVID), SPEC]);
    const env = ['env', `XENSTORED_PATH=${path.join(dir, 'xenstored.sock')}`];
    execFileSync(env[0], [...env.slice(1), frontend, dir, String(DOMID), String(DEVID), 'fill'], { timeout: 600_000 });
    const args = ['bench', '--bs', String(w.bs), '--qd', String(w.qd), '--count', String(w.count), ...(w.random ? ['--random'] : [])];
    const client = [...clientCpu, 'env', `XENSTORED_PATH=${path.join(dir, 'xenstored.sock')}`, frontend, dir, String(DOMID), String(DEVID), ...args];
    return measure(
      server.pid!,
      client,
      () => w.count,
      (out) => {
        const m = /ok bench .*?([\d.]+) IOPS, ([\d.]+) MiB\/s/.exec(out);
        if (!m) throw new Error(`unexpected frontend output: ${out}`);
        return w.unit === 'IOPS' ? Number(m[1]) : Number(m[2]);
      },
    );
  } finally {
    stop(server);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

// ---- NBD ------------------------------------------------------------------------------

function nbdSample(w: Workload): Sample {
  const socket = path.join(OUT, 'nbd.sock');
  const server = start([...serverCpu, process.execPath, CLI, 'serve', '--quiet', '--socket', socket, SPEC]);
  const uri = `nbd+unix:///?socket=${socket}`;
  try {
    waitUntil('tapkit serve', () => spawnSync('nbdinfo', ['--size', uri], { timeout: 5000 }).status === 0, 30, server);
    execFileSync('nbdcopy', [IMAGE, uri], { timeout: 600_000 });
    const fio = [
      ...clientCpu, 'fio', '--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--rw=${w.random ? 'randread' : 'read'}`, `--bs=${w.bs}`, `--iodepth=${w.qd}`,
      '--thread', '--norandommap', '--randrepeat=0', '--time_based', `--runtime=${RUNTIME}`, `--size=${SIZE_MIB}M`, '--output-format=json',
    ];
    let job: { read: { iops: number; bw_bytes: number; total_ios: number } } | undefined;
    const parseJob = (out: string) => (job ??= JSON.parse(out.slice(out.indexOf('{'))).jobs[0]);
    return measure(
      server.pid!,
      fio,
      (out) => parseJob(out)!.read.total_ios,
      (out) => (w.unit === 'IOPS' ? parseJob(out)!.read.iops : parseJob(out)!.read.bw_bytes / 2 ** 20),
    );
  } finally {
    stop(server);
    fs.rmSync(socket, { force: true });
  }
}

// ---- run and report -----------------------------------------------------------------

function main(): void {
  const frontend = frontendBinary();
  execFileSync('dd', ['if=/dev/urandom', `of=${IMAGE}`, 'bs=1M', `count=${SIZE_MIB}`, 'status=none']);
  const results = new Map<string, Sample[]>();
  for (let rep = 0; rep < ROUNDS; rep++) {
    for (const w of WORKLOADS) {
      for (const [path, sample] of [
        ['ring', () => ringSample(frontend, w)],
        ['nbd', () => nbdSample(w)],
      ] as const) {
        const s = sample();
        const key = `${path}/${w.id}`;
        results.set(key, [...(results.get(key) ?? []), s]);
        process.stderr.write(`round ${rep + 1} ${key}: ${s.value.toFixed(0)} (server ${s.cpuUsPerRequest.toFixed(1)} CPU-µs/request, others ${s.others.toFixed(0)}%)\n`);
      }
    }
  }
  const lines = [`# blkif ring (sim, C frontend) vs NBD (fio nbd engine), ${SPEC}, ${ROUNDS} rounds, pin=${PIN}`, ''];
  lines.push('| workload | path | median | min–max | server CPU-µs/request | others % (max) | paired ratio ring÷nbd (median, min–max) |', '|---|---|---|---|---|---|---|');
  for (const w of WORKLOADS) {
    const ring = results.get(`ring/${w.id}`)!;
    const nbd = results.get(`nbd/${w.id}`)!;
    const ratios = ring.map((s, i) => s.value / nbd[i].value);
    recordRatios({ bench: 'xen', pair: 'sim ring / tapkit NBD', workload: `${w.id} (${w.unit})`, ratios, maxForeignPct: Math.max(...ring.map((s) => s.others), ...nbd.map((s) => s.others)) });
    for (const [name, samples] of [
      ['ring', ring],
      ['nbd', nbd],
    ] as const) {
      const v = samples.map((s) => s.value);
      lines.push(
        `| ${w.id} (${w.unit}) | ${name} | ${median(v).toFixed(0)} | ${Math.min(...v).toFixed(0)}–${Math.max(...v).toFixed(0)} | ${median(samples.map((s) => s.cpuUsPerRequest)).toFixed(1)} | ${Math.max(...samples.map((s) => s.others)).toFixed(0)} | ${
          name === 'ring' ? `${median(ratios).toFixed(2)} (${Math.min(...ratios).toFixed(2)}–${Math.max(...ratios).toFixed(2)})` : ''
        } |`,
      );
    }
  }
  lines.push('', `Clients differ: the ring is driven by test/xen/frontend.c (one thread, polls its event socket), NBD by fio + libnbd. Both serve ${SPEC}.`);
  const report = lines.join('\n');
  fs.writeFileSync(path.join(OUT, 'results.md'), `${report}\n`);
  process.stdout.write(`${report}\n\nresults in ${OUT}\n`);
}

main();
