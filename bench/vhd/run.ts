/**
 * VHD benchmark (not a test): `tapkit serve` against `qemu-nbd -f vpc` on a 1 GiB dynamic
 * VHD made by qemu-img with every block allocated (random data), both pinned to CPU 1 and
 * driven by the same fio job (nbd engine, libnbd) pinned to CPU 0:
 *   sequential 1 MiB reads at QD8, random 4 KiB reads at QD32,
 *   sequential 1 MiB writes at QD8, random 4 KiB writes at QD32.
 * Each server gets a fresh copy of the image for each round, so writes meet the same image.
 *
 * Rounds are interleaved (the order alternates), each measurement waits (bounded) for a
 * quiet machine and records the foreign CPU seen during it; every cell prints the median,
 * the min–max and the paired ratio tapkit ÷ qemu-nbd (speed; > 1 means tapkit is faster).
 * Method: /work/shared/reference/bench-method.md. Target: >= 0.8 on sequential read.
 *
 * Run: npm run build && node dist/bench/vhd/run.js
 * Environment: ROUNDS (3), RUNTIME seconds per fio job (8), SIZE_MIB (1024), WORKDIR (a
 * fresh dir on /dev/shm), KEEP=1 keeps the work directory.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const ROUNDS = Number(process.env.ROUNDS ?? 3);
const RUNTIME = Number(process.env.RUNTIME ?? 8);
const SIZE_MIB = Number(process.env.SIZE_MIB ?? 1024);
const CLI = path.join(__dirname, '..', '..', 'core', 'cli', 'main.js');
const SERVER_CPU = '1';
const CLIENT_CPU = '0';
const CLK_TCK = 100;

const workdir = process.env.WORKDIR ?? fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), 'tapkit-bench-vhd-'));
const children = new Set<ChildProcess>();
function cleanup(): void {
  for (const c of children) c.kill('SIGKILL');
  if (!process.env.KEEP) fs.rmSync(workdir, { recursive: true, force: true });
}
process.on('exit', cleanup);
for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => process.exit(130));

// ---------------------------------------------------------------- CPU accounting

function systemTicks(): { busy: number; steal: number } {
  const cpu = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  return { busy: cpu[0] + cpu[1] + cpu[2], steal: cpu[7] ?? 0 };
}
function processTicks(pid: number | 'self', withChildren: boolean): number {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ').map(Number);
    // Fields after the name: utime is 14th overall (index 11 here), stime 12, cutime 13, cstime 14.
    return withChildren ? f[13] + f[14] : f[11] + f[12];
  } catch {
    return 0;
  }
}

interface Sample {
  seconds: number;
  /** CPU-seconds of the measured process(es). */
  cpu: number;
  /** Other processes' CPU during the measurement, % of one CPU. */
  foreign: number;
  steal: number;
}

/** Measures `fn`; `serverPid` is a long-running server (else the work is our waited-for children). */
async function measure(fn: () => Promise<void> | void, serverPid?: number): Promise<Sample> {
  const s0 = systemTicks();
  const k0 = processTicks('self', true) + processTicks('self', false);
  const p0 = serverPid ? processTicks(serverPid, false) : 0;
  const t0 = process.hrtime.bigint();
  await fn();
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const s1 = systemTicks();
  const k1 = processTicks('self', true) + processTicks('self', false);
  const p1 = serverPid ? processTicks(serverPid, false) : 0;
  const own = (k1 - k0) + (p1 - p0);
  const foreign = Math.max(0, (100 * (s1.busy - s0.busy - own)) / CLK_TCK / seconds);
  return { seconds, cpu: (serverPid ? p1 - p0 : k1 - k0) / CLK_TCK, foreign, steal: (100 * (s1.steal - s0.steal)) / CLK_TCK / seconds };
}

/** Waits (at most 30 s) until other processes use less than 15 % of a CPU. */
async function waitQuiet(): Promise<void> {
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    const s = await measure(() => new Promise((r) => setTimeout(r, 1000)));
    if (s.foreign < 15) return;
  }
}

// ---------------------------------------------------------------- tools

function run(cmd: string, args: string[], timeoutMs = 15 * 60_000): void {
  const r = spawnSync(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], timeout: timeoutMs, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status ?? r.signal}): ${r.stderr}`);
}
function output(cmd: string, args: string[]): string {
  return spawnSync(cmd, args, { encoding: 'utf8', timeout: 60_000 }).stdout ?? '';
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}
function cell(xs: number[], digits = 0): string {
  return `${median(xs).toFixed(digits)} (${Math.min(...xs).toFixed(digits)}–${Math.max(...xs).toFixed(digits)})`;
}

// ---------------------------------------------------------------- servers

async function startServer(label: string, args: string[], socket: string): Promise<ChildProcess | undefined> {
  const child = spawn('taskset', ['-c', SERVER_CPU, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  children.add(child);
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) break;
    if (spawnSync('nbdinfo', ['--size', `nbd+unix:///?socket=${socket}`], { timeout: 5000 }).status === 0) return child;
    await new Promise((r) => setTimeout(r, 200));
  }
  console.log(`  ${label} did not start: ${stderr.trim().split('\n').slice(-2).join(' ') || 'no answer on its socket'}`);
  stopServer(child);
  return undefined;
}

function stopServer(child: ChildProcess): void {
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  child.once('exit', () => {
    clearTimeout(timer);
    children.delete(child);
  });
}

interface Job {
  id: string;
  rw: 'read' | 'randread' | 'write' | 'randwrite';
  bs: string;
  qd: number;
  metric: 'mibs' | 'iops';
}

const JOBS: Job[] = [
  { id: 'seqread 1M QD8', rw: 'read', bs: '1M', qd: 8, metric: 'mibs' },
  { id: 'randread 4k QD32', rw: 'randread', bs: '4k', qd: 32, metric: 'iops' },
  { id: 'seqwrite 1M QD8', rw: 'write', bs: '1M', qd: 8, metric: 'mibs' },
  { id: 'randwrite 4k QD32', rw: 'randwrite', bs: '4k', qd: 32, metric: 'iops' },
];

/** One fio job; the result in the job's metric. */
function fio(socket: string, job: Job): number {
  const json = path.join(workdir, 'fio.json');
  run('timeout', [String(RUNTIME + 60), 'taskset', '-c', CLIENT_CPU, 'fio', '--name=bench', '--ioengine=nbd', `--uri=nbd+unix:///?socket=${socket}`,
    `--rw=${job.rw}`, `--bs=${job.bs}`, `--iodepth=${job.qd}`, '--thread', `--size=${SIZE_MIB}M`, '--norandommap', '--randrepeat=0', '--group_reporting',
    '--time_based', `--runtime=${RUNTIME}`, '--ramp_time=1', '--output-format=json', `--output=${json}`]);
  const text = fs.readFileSync(json, 'utf8');
  const result = JSON.parse(text.slice(text.indexOf('{'))).jobs[0];
  const side = job.rw.includes('write') ? result.write : result.read;
  return job.metric === 'mibs' ? side.bw_bytes / 2 ** 20 : side.iops;
}

function makeImage(): string {
  const raw = path.join(workdir, 'source.raw');
  const image = path.join(workdir, 'full.vhd');
  const fd = fs.openSync(raw, 'w');
  for (let i = 0; i < SIZE_MIB; i++) fs.writeSync(fd, crypto.randomBytes(2 ** 20));
  fs.closeSync(fd);
  // force_size: the disk is exactly SIZE_MIB (qemu would round it up to a CHS size otherwise).
  run('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=dynamic,force_size=on', raw, image]);
  fs.rmSync(raw);
  console.log(`image: ${image}, ${SIZE_MIB} MiB dynamic VHD (2 MiB blocks, all allocated), ${(fs.statSync(image).size / 2 ** 20).toFixed(0)} MiB file`);
  return image;
}

async function main(): Promise<void> {
  for (const tool of ['qemu-img', 'qemu-nbd', 'fio', 'nbdinfo', 'taskset']) {
    if (spawnSync('which', [tool]).status !== 0) throw new Error(`${tool} is missing`);
  }
  console.log(`tapkit vhd bench: ${ROUNDS} rounds, ${os.cpus().length} CPUs (${os.cpus()[0]?.model}), node ${process.version}, ${output('qemu-nbd', ['--version']).split('\n')[0]}`);
  console.log(`work directory: ${workdir}`);
  const original = makeImage();
  const servers: Record<string, (socket: string, image: string) => string[]> = {
    qemu: (socket, image) => ['qemu-nbd', '-t', '-e', '8', '-f', 'vpc', '-k', socket, image],
    tapkit: (socket, image) => [process.execPath, CLI, 'serve', '--quiet', '--socket', socket, `vhd:${image}`],
  };
  const values: Record<string, Record<string, number[]>> = {};
  const cpu: Record<string, Record<string, number[]>> = {};
  const ratios: Record<string, number[]> = {};
  for (let round = 0; round < ROUNDS; round++) {
    const order = round % 2 ? ['tapkit', 'qemu'] : ['qemu', 'tapkit'];
    const roundValues: Record<string, Record<string, number>> = {};
    for (const who of order) {
      const image = path.join(workdir, `${who}.vhd`);
      fs.copyFileSync(original, image);
      const socket = path.join(workdir, `${who}.sock`);
      fs.rmSync(socket, { force: true });
      const server = await startServer(who, servers[who](socket, image), socket);
      if (!server) throw new Error(`${who} did not start`);
      try {
        for (const job of JOBS) {
          await waitQuiet();
          let value = 0;
          const sample = await measure(() => {
            value = fio(socket, job);
          }, server.pid!);
          ((values[job.id] ??= {})[who] ??= []).push(value);
          ((cpu[job.id] ??= {})[who] ??= []).push((sample.cpu / sample.seconds) * 100);
          (roundValues[job.id] ??= {})[who] = value;
          console.log(`  round ${round + 1} ${who} ${job.id}: ${value.toFixed(0)} ${job.metric === 'mibs' ? 'MiB/s' : 'IOPS'}, server CPU ${((sample.cpu / sample.seconds) * 100).toFixed(0)} %, foreign ${sample.foreign.toFixed(0)} %${sample.foreign > 25 ? ' (NOISY)' : ''}`);
        }
      } finally {
        stopServer(server);
        await new Promise((r) => setTimeout(r, 300));
        fs.rmSync(image, { force: true });
      }
    }
    for (const job of JOBS) (ratios[job.id] ??= []).push(roundValues[job.id].tapkit / roundValues[job.id].qemu);
  }
  console.log(`\nserve over NBD (fio nbd engine on CPU ${CLIENT_CPU}, servers on CPU ${SERVER_CPU}; median (min–max)):`);
  for (const job of JOBS) {
    const unit = job.metric === 'mibs' ? 'MiB/s' : 'IOPS';
    console.log(`  ${job.id}: qemu-nbd ${cell(values[job.id].qemu)} ${unit} (CPU ${cell(cpu[job.id].qemu)} %), tapkit ${cell(values[job.id].tapkit)} ${unit} (CPU ${cell(cpu[job.id].tapkit)} %)`);
    console.log(`    ratio tapkit/qemu-nbd (paired per round): ${cell(ratios[job.id], 2)}${job.id.startsWith('seqread') ? '   target >= 0.80' : ''}`);
  }
}

main().catch((e) => {
  console.error(`bench failed: ${e instanceof Error ? e.message : String(e)}`);
  process.exitCode = 1;
});
