/**
 * qcow2 read benchmark (not a test): tapkit against qemu on a 1 GiB qcow2 whose clusters
 * are half compressed (zlib), half stored, made by qemu-img.
 *
 *  1. convert: `tapkit convert IMG out.raw` vs `qemu-img convert -O raw IMG out.raw`,
 *     both pinned to the same CPU (one core each), output on tmpfs.
 *  2. serve:   `tapkit serve --read-only` vs `qemu-nbd --read-only`, each pinned to CPU 1,
 *     driven by the same fio job (nbd engine, libnbd) pinned to CPU 0: sequential 1 MiB
 *     reads at QD8 and random 4 KiB reads at QD32.
 *
 * Rounds are interleaved (the order alternates), each measurement waits (bounded) for a
 * quiet machine and records the foreign CPU seen during it, and every cell prints the
 * median, the min–max and the paired ratio tapkit ÷ qemu (speed; > 1 means tapkit is faster).
 * Method: /work/shared/reference/bench-method.md.
 *
 * Run: npm run build && node dist/bench/qcow2/run.js
 * Environment: ROUNDS (3), RUNTIME seconds per fio job (8), WORKDIR (a fresh dir on /dev/shm),
 * SIZE_MIB (1024), KEEP=1 keeps the work directory.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const ROUNDS = Number(process.env.ROUNDS ?? 3);
const RUNTIME = Number(process.env.RUNTIME ?? 8);
const SIZE_MIB = Number(process.env.SIZE_MIB ?? 1024);
const CLUSTER = 64 * 1024;
const CLI = path.join(__dirname, '..', '..', 'core', 'cli', 'main.js');
const SERVER_CPU = '1';
const CLIENT_CPU = '0';
const CLK_TCK = 100;

const workdir = process.env.WORKDIR ?? fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), 'tapkit-bench-qcow2-'));
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

// ---------------------------------------------------------------- the image

function makeImage(): string {
  const raw = path.join(workdir, 'source.raw');
  const image = path.join(workdir, 'half-compressed.qcow2');
  const fd = fs.openSync(raw, 'w');
  const text = Buffer.alloc(CLUSTER);
  for (let i = 0; i < SIZE_MIB * 16; i++) {
    // Even clusters compress (text), odd clusters are random and stay stored.
    if (i % 2 === 0) {
      text.fill(`cluster ${i}: a line of compressible text for the qcow2 benchmark. `);
      fs.writeSync(fd, text);
    } else {
      fs.writeSync(fd, crypto.randomBytes(CLUSTER));
    }
  }
  fs.closeSync(fd);
  run('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${CLUSTER}`, raw, image]);
  fs.rmSync(raw);
  const check = JSON.parse(output('qemu-img', ['check', '--output=json', image])) as Record<string, number>;
  console.log(`image: ${image}, ${SIZE_MIB} MiB virtual, ${(fs.statSync(image).size / 2 ** 20).toFixed(0)} MiB file, ` +
    `${check['compressed-clusters']} of ${check['allocated-clusters']} clusters compressed`);
  return image;
}

// ---------------------------------------------------------------- 1. convert

async function benchConvert(image: string): Promise<void> {
  const out = path.join(workdir, 'out.raw');
  const commands: Record<string, string[]> = {
    qemu: ['taskset', '-c', SERVER_CPU, 'qemu-img', 'convert', '-f', 'qcow2', '-O', 'raw', image, out],
    tapkit: ['taskset', '-c', SERVER_CPU, process.execPath, CLI, 'convert', `qcow2:${image}`, out],
  };
  const results: Record<string, Sample[]> = { qemu: [], tapkit: [] };
  const ratios: number[] = [];
  let verified = false;
  for (let round = 0; round < ROUNDS; round++) {
    const order = round % 2 ? ['tapkit', 'qemu'] : ['qemu', 'tapkit'];
    const times: Record<string, number> = {};
    for (const who of order) {
      fs.rmSync(out, { force: true });
      await waitQuiet();
      const [cmd, ...args] = commands[who];
      const sample = await measure(() => run(cmd, args));
      results[who].push(sample);
      times[who] = sample.seconds;
      console.log(`  convert round ${round + 1} ${who}: ${sample.seconds.toFixed(2)} s, CPU ${sample.cpu.toFixed(2)} s, foreign ${sample.foreign.toFixed(0)} %${sample.foreign > 25 ? ' (NOISY)' : ''}`);
      if (!verified && who === 'tapkit') {
        const ref = path.join(workdir, 'ref.raw');
        run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, ref]);
        run('cmp', [ref, out]);
        fs.rmSync(ref);
        verified = true;
      }
    }
    ratios.push(times.qemu / times.tapkit);
  }
  fs.rmSync(out, { force: true });
  const mibs = (s: Sample[]) => s.map((x) => SIZE_MIB / x.seconds);
  console.log('\nconvert to raw (MiB/s of virtual disk, median (min–max)), both on one CPU:');
  console.log(`  qemu-img convert: ${cell(mibs(results.qemu))}   CPU-s ${cell(results.qemu.map((s) => s.cpu), 2)}`);
  console.log(`  tapkit convert:   ${cell(mibs(results.tapkit))}   CPU-s ${cell(results.tapkit.map((s) => s.cpu), 2)}`);
  console.log(`  ratio tapkit/qemu (speed, paired per round): ${cell(ratios, 2)}   target >= 0.70\n`);
}

// ---------------------------------------------------------------- 2. serve

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

interface FioResult {
  mibs: number;
  iops: number;
}

function fio(socket: string, rw: string, bs: string, qd: number): FioResult {
  const json = path.join(workdir, 'fio.json');
  run('timeout', [String(RUNTIME + 60), 'taskset', '-c', CLIENT_CPU, 'fio', '--name=bench', '--ioengine=nbd', `--uri=nbd+unix:///?socket=${socket}`,
    `--rw=${rw}`, `--bs=${bs}`, `--iodepth=${qd}`, '--thread', `--size=${SIZE_MIB}M`, '--norandommap', '--randrepeat=0', '--group_reporting',
    '--time_based', `--runtime=${RUNTIME}`, '--ramp_time=1', '--output-format=json', `--output=${json}`]);
  const text = fs.readFileSync(json, 'utf8');
  const job = JSON.parse(text.slice(text.indexOf('{'))).jobs[0];
  return { mibs: job.read.bw_bytes / 2 ** 20, iops: job.read.iops };
}

async function benchServe(image: string): Promise<void> {
  const jobs = [
    { id: 'seqread 1M QD8', rw: 'read', bs: '1M', qd: 8, metric: 'mibs' as const },
    { id: 'randread 4k QD32', rw: 'randread', bs: '4k', qd: 32, metric: 'iops' as const },
  ];
  const servers: Record<string, (socket: string) => string[]> = {
    qemu: (socket) => ['qemu-nbd', '--read-only', '-t', '-e', '8', '-f', 'qcow2', '-k', socket, image],
    tapkit: (socket) => [process.execPath, CLI, 'serve', '--read-only', '--quiet', '--socket', socket, `qcow2:${image}`],
  };
  const values: Record<string, Record<string, number[]>> = {};
  const cpu: Record<string, Record<string, number[]>> = {};
  const ratios: Record<string, number[]> = {};
  for (let round = 0; round < ROUNDS; round++) {
    const order = round % 2 ? ['tapkit', 'qemu'] : ['qemu', 'tapkit'];
    const roundValues: Record<string, Record<string, number>> = {};
    for (const who of order) {
      const socket = path.join(workdir, `${who}.sock`);
      fs.rmSync(socket, { force: true });
      const server = await startServer(who, servers[who](socket), socket);
      if (!server) {
        if (who === 'tapkit') console.log('  tapkit serve is not available in this build: the serve comparison was NOT run.');
        return;
      }
      try {
        for (const job of jobs) {
          await waitQuiet();
          let result: FioResult | undefined;
          const sample = await measure(() => {
            result = fio(socket, job.rw, job.bs, job.qd);
          }, server.pid!);
          const value = result![job.metric];
          ((values[job.id] ??= {})[who] ??= []).push(value);
          ((cpu[job.id] ??= {})[who] ??= []).push((sample.cpu / sample.seconds) * 100);
          (roundValues[job.id] ??= {})[who] = value;
          console.log(`  serve round ${round + 1} ${who} ${job.id}: ${value.toFixed(0)} ${job.metric === 'mibs' ? 'MiB/s' : 'IOPS'}, server CPU ${((sample.cpu / sample.seconds) * 100).toFixed(0)} %, foreign ${sample.foreign.toFixed(0)} %${sample.foreign > 25 ? ' (NOISY)' : ''}`);
        }
      } finally {
        stopServer(server);
        await new Promise((r) => setTimeout(r, 300));
      }
    }
    for (const job of jobs) (ratios[job.id] ??= []).push(roundValues[job.id].tapkit / roundValues[job.id].qemu);
  }
  console.log(`\nserve over NBD (fio nbd engine on CPU ${CLIENT_CPU}, servers on CPU ${SERVER_CPU}; median (min–max)):`);
  for (const job of jobs) {
    const unit = job.metric === 'mibs' ? 'MiB/s' : 'IOPS';
    console.log(`  ${job.id}: qemu-nbd ${cell(values[job.id].qemu)} ${unit} (CPU ${cell(cpu[job.id].qemu)} %), tapkit ${cell(values[job.id].tapkit)} ${unit} (CPU ${cell(cpu[job.id].tapkit)} %)`);
    console.log(`    ratio tapkit/qemu (paired per round): ${cell(ratios[job.id], 2)}   target >= 0.70`);
  }
}

async function main(): Promise<void> {
  for (const tool of ['qemu-img', 'qemu-nbd', 'fio', 'nbdinfo', 'taskset', 'cmp']) {
    if (spawnSync('which', [tool]).status !== 0) throw new Error(`${tool} is missing`);
  }
  console.log(`tapkit qcow2 bench: ${ROUNDS} rounds, ${os.cpus().length} CPUs (${os.cpus()[0]?.model}), node ${process.version}, ${output('qemu-img', ['--version']).split('\n')[0]}`);
  console.log(`work directory: ${workdir}`);
  const image = makeImage();
  await benchConvert(image);
  await benchServe(image);
}

main().catch((e) => {
  console.error(`bench failed: ${e instanceof Error ? e.message : String(e)}`);
  process.exitCode = 1;
});
