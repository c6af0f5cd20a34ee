/**
 * Remote-disk benchmark (not a test): one object of random bytes (1 GiB) on nginx, on tmpfs,
 * served over NBD by
 *   tapkit-http   `tapkit serve http://127.0.0.1:PORT/disk.raw`
 *   nbdkit-curl   `nbdkit curl url=http://127.0.0.1:PORT/disk.raw`
 * and read by the same client, fio's nbd engine (libnbd):
 *   seqread  sequential 1 MiB reads, QD8        (target: tapkit ≥ 1.0× nbdkit-curl)
 *   rr32     random 4 KiB reads, QD32
 * Method (/work/shared/reference/bench-method.md): server and nginx pinned to CPU 1, fio to
 * CPU 0; rounds outermost, the servers' order alternating inside a round; a quiet gate before
 * every measurement, which records the CPU other processes used meanwhile; each cell prints
 * the median (min–max), the server's CPU cost (CPU-s per GiB, CPU-µs per request) and nginx's,
 * and the paired ratio tapkit ÷ nbdkit-curl (speed; above 1 means tapkit is faster).
 *
 * Run: npm run bench -- http     (or: npm run build && node dist/bench/http/run.js)
 * Environment: ROUNDS (3), RUNTIME seconds per fio job (10), SIZE_MIB (1024),
 * SERVERS ("tapkit-http nbdkit-curl"), TESTS ("seqread rr32"), TAPKIT_SPEC_OPTS (http
 * options for tapkit, e.g. ",connections=16"), WORKDIR / KEEP (see bench/lib).
 */
import { type ChildProcess, spawnSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
// The same nginx configuration the tests use.
import { freePort, nginxConfig } from '../../test/helpers/nginx';
import {
  benchWorkdir, CLK_TCK, roundsFromEnv, fioNbd, fmtRange, output, pairedRatios, placement, processTicks, recordRatios, requireTools,
  startCpuMeter, startNbdServer, startProcess, stopProcess, waitQuiet, waitUntil,
} from '../lib';

const ROUNDS = roundsFromEnv(3);
const RUNTIME = Number(process.env.RUNTIME ?? 10);
const SIZE_MIB = Number(process.env.SIZE_MIB ?? 1024);
const SERVERS = (process.env.SERVERS ?? 'tapkit-http nbdkit-curl').split(/\s+/).filter(Boolean);
const TESTS = (process.env.TESTS ?? 'seqread rr32').split(/\s+/).filter(Boolean);
const TAPKIT_SPEC_OPTS = process.env.TAPKIT_SPEC_OPTS ?? '';
const CLI = path.join(__dirname, '..', '..', 'core', 'cli', 'main.js');
const MINE = 'tapkit-http';
const PEER = 'nbdkit-curl';
const pin = placement();
const workdir = benchWorkdir('http');

interface Job {
  id: string;
  label: string;
  rw: 'read' | 'randread';
  bs: string;
  qd: number;
  metric: 'mibs' | 'iops';
  target?: string;
}

const ALL_JOBS: Job[] = [
  { id: 'seqread', label: 'seqread (1M read QD8, MiB/s)', rw: 'read', bs: '1M', qd: 8, metric: 'mibs', target: '>= 1.0' },
  { id: 'rr32', label: 'rr32 (4k randread QD32, IOPS)', rw: 'randread', bs: '4k', qd: 32, metric: 'iops' },
];
const JOBS = ALL_JOBS.filter((job) => TESTS.includes(job.id));

/** One object of random bytes; random so that nothing on the way can shortcut it. */
function makeObject(dir: string): void {
  const file = path.join(dir, 'disk.raw');
  const fd = fs.openSync(file, 'w');
  for (let i = 0; i < SIZE_MIB; i++) fs.writeSync(fd, crypto.randomBytes(1 << 20));
  fs.closeSync(fd);
}

/** nginx serving `root` on 127.0.0.1, pinned with the servers (it is part of the path they are measured on). */
async function startNginx(root: string): Promise<{ child: ChildProcess; url: string; pids: () => number[] }> {
  const dir = path.join(workdir, 'nginx');
  fs.mkdirSync(dir, { recursive: true });
  const port = await freePort();
  const conf = path.join(dir, 'nginx.conf');
  fs.writeFileSync(conf, nginxConfig(dir, port, root));
  const child = startProcess([...pin.server, 'nginx', '-c', conf, '-p', dir, '-g', 'daemon off;']);
  const url = `http://127.0.0.1:${port}/disk.raw`;
  try {
    waitUntil('nginx', () => spawnSync('curl', ['-sfI', '--max-time', '2', url]).status === 0, 30, child);
  } catch (e) {
    const log = fs.existsSync(path.join(dir, 'error.log')) ? fs.readFileSync(path.join(dir, 'error.log'), 'utf8') : '';
    throw new Error(`${(e as Error).message}\n${log}`);
  }
  // The master and its worker (taskset execs nginx in place, so child.pid is the master).
  const pids = () => [child.pid!, ...output(['pgrep', '-P', String(child.pid)]).split('\n').filter(Boolean).map(Number)];
  return { child, url, pids };
}

function serverCommand(name: string, url: string, socket: string): string[] {
  if (name === MINE) return [process.execPath, CLI, 'serve', '--quiet', '--socket', socket, `http${TAPKIT_SPEC_OPTS}:${url}`];
  if (name === PEER) return ['nbdkit', '-f', '--exit-with-parent', '-r', '-U', socket, 'curl', `url=${url}`];
  throw new Error(`unknown server ${name} (known: ${MINE} ${PEER})`);
}

interface Cell {
  value: number[];
  /** Server CPU-s per GiB (seqread) or CPU-µs per request (rr32). */
  cost: number[];
  nginxCost: number[];
  cpuPct: number[];
}

async function main(): Promise<void> {
  requireTools('nginx', 'nbdkit', 'fio', 'nbdinfo', 'taskset', 'curl', 'pgrep');
  if (spawnSync('nbdkit', ['curl', '--version']).status !== 0) throw new Error("nbdkit's curl plugin is missing (nbdkit-plugin-curl)");
  console.log(`tapkit http bench: ${ROUNDS} rounds of ${RUNTIME} s, ${os.cpus().length} × ${os.cpus()[0]?.model}, node ${process.version}, ` +
    `${output(['nbdkit', '--version']).trim()}, ${output(['nginx', '-v']).trim() || 'nginx'}; ${pin.describe()}, nginx pinned with the servers`);
  console.log(`work directory: ${workdir}`);
  const data = path.join(workdir, 'data');
  fs.mkdirSync(data);
  makeObject(data);
  const nginx = await startNginx(data);
  console.log(`nginx serves ${nginx.url} (${SIZE_MIB} MiB)`);

  const cells: Record<string, Record<string, Cell>> = {};
  const maxForeign: Record<string, number> = {};
  for (let round = 0; round < ROUNDS; round++) {
    const order = round % 2 ? [...SERVERS].reverse() : SERVERS;
    for (const name of order) {
      const socket = path.join(workdir, `${name}.sock`);
      let server: ChildProcess;
      try {
        server = startNbdServer(name, [...pin.server, ...serverCommand(name, nginx.url, socket)], socket);
      } catch (e) {
        console.log(`  ${name} did not start (${(e as Error).message}); no numbers for it this round`);
        continue;
      }
      try {
        for (const job of JOBS) {
          const nginxPids = nginx.pids();
          waitQuiet([server.pid!, ...nginxPids]);
          const nginx0 = nginxPids.reduce((s, p) => s + processTicks(p), 0);
          const meter = startCpuMeter([server.pid!], nginxPids);
          const side = fioNbd(socket, { rw: job.rw, bs: job.bs, iodepth: job.qd, size: `${SIZE_MIB}M`, runtime: RUNTIME }, pin.client);
          const sample = meter();
          const nginxSeconds = (nginxPids.reduce((s, p) => s + processTicks(p), 0) - nginx0) / CLK_TCK;
          // fio's rate is over its runtime; the meter also saw the 1 s ramp: cost is per unit of work the meter saw.
          const value = job.metric === 'mibs' ? side.bw_bytes / 2 ** 20 : side.iops;
          const work = job.metric === 'mibs' ? (side.bw_bytes * sample.seconds) / 2 ** 30 : side.iops * sample.seconds;
          const per = (cpu: number) => (job.metric === 'mibs' ? cpu / work : (cpu * 1e6) / work);
          const cell = ((cells[job.id] ??= {})[name] ??= { value: [], cost: [], nginxCost: [], cpuPct: [] });
          while (cell.value.length < round) {
            for (const list of Object.values(cell)) list.push(NaN);
          }
          cell.value.push(value);
          cell.cost.push(per(sample.serverSeconds));
          cell.nginxCost.push(per(nginxSeconds));
          cell.cpuPct.push((100 * sample.serverSeconds) / sample.seconds);
          maxForeign[job.id] = Math.max(maxForeign[job.id] ?? 0, sample.foreignPct);
          const unit = job.metric === 'mibs' ? 'MiB/s' : 'IOPS';
          const costUnit = job.metric === 'mibs' ? 'CPU-s/GiB' : 'CPU-µs/req';
          console.log(`  round ${round + 1} ${name.padEnd(12)} ${job.id.padEnd(8)} ${value.toFixed(0).padStart(7)} ${unit}, server CPU ${cell.cpuPct.at(-1)!.toFixed(0)} % ` +
            `(${cell.cost.at(-1)!.toFixed(job.metric === 'mibs' ? 2 : 0)} ${costUnit}), nginx ${cell.nginxCost.at(-1)!.toFixed(job.metric === 'mibs' ? 2 : 0)} ${costUnit}, ` +
            `foreign ${sample.foreignPct.toFixed(0)} %${sample.foreignPct > 25 ? ' (NOISY)' : ''}`);
        }
      } finally {
        stopProcess(server);
      }
    }
  }
  stopProcess(nginx.child);

  console.log(`\nhttp over NBD (fio nbd engine; ${pin.describe()}; median (min–max) over ${ROUNDS} rounds):`);
  for (const job of JOBS) {
    const unit = job.metric === 'mibs' ? 'MiB/s' : 'IOPS';
    const costUnit = job.metric === 'mibs' ? 'server CPU-s per GiB' : 'server CPU-µs per request';
    const digits = job.metric === 'mibs' ? 2 : 0;
    console.log(`  ${job.label}`);
    for (const name of SERVERS) {
      const cell = cells[job.id]?.[name];
      if (!cell) continue;
      const ok = (xs: number[]) => xs.filter((x) => !Number.isNaN(x));
      console.log(`    ${name.padEnd(12)} ${fmtRange(ok(cell.value))} ${unit}; ${costUnit} ${fmtRange(ok(cell.cost), digits)} (nginx ${fmtRange(ok(cell.nginxCost), digits)}); CPU ${fmtRange(ok(cell.cpuPct))} %`);
    }
    const mine = cells[job.id]?.[MINE];
    const peer = cells[job.id]?.[PEER];
    if (!mine || !peer) continue;
    const valid = (xs: number[]) => xs.map((x) => (Number.isNaN(x) ? undefined : x));
    const ratios = pairedRatios(valid(mine.value), valid(peer.value));
    // Cost ratio: peer's CPU per unit ÷ ours (above 1 = tapkit spends less per unit of work).
    const costRatios = pairedRatios(valid(peer.cost), valid(mine.cost));
    console.log(`    ratio ${MINE}/${PEER} (speed, paired per round): ${fmtRange(ratios, 2)}${job.target ? `   target ${job.target}` : ''}`);
    console.log(`    ratio of CPU efficiency (${PEER} cost ÷ ${MINE} cost, paired): ${fmtRange(costRatios, 2)}`);
    recordRatios({ bench: 'http', pair: `${MINE} / ${PEER}`, workload: job.label, ratios, maxForeignPct: maxForeign[job.id] ?? 0, target: job.target });
  }
}

main().catch((e) => {
  console.error(`bench failed: ${e instanceof Error ? e.message : String(e)}`);
  process.exitCode = 1;
});
