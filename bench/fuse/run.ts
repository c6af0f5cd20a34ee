/**
 * FUSE export benchmark: the same 1 GiB of random bytes behind a loop device, served by
 *   A. tapkit's FUSE export   (`tapkit mount memory:1G --loop`), and
 *   B. nbdkit memory + nbdfuse (libfuse) + losetup,
 * read with fio on the loop device (direct=1): sequential 1 MiB reads at QD8 (libaio),
 * 4 KiB random reads at QD32 (libaio) and at QD1 (psync). Not a test; run by hand as root:
 *
 *   npm run build && node dist/bench/fuse/run.js        (ROUNDS=5 RUNTIME=8 to change)
 *
 * Method (/work/shared/reference/bench-method.md): servers pinned to CPU 1, fio to CPU 0;
 * rounds outermost (A B, A B, ...); per cell the median and min–max; the paired ratio
 * A÷B inside each round; server CPU per GiB / per request from /proc/PID/stat; foreign
 * CPU (everything not server or fio, which here includes the kernel's loop workers)
 * recorded per cell; each measurement waits (bounded) for a quiet machine first.
 */
import { execFile, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { readMounts } from '../../core/fuse/mounts';
import { median, pairedRatios, placement, recordRatios, roundsFromEnv, startCpuMeter, startProcess, waitQuiet } from '../lib';

const ROUNDS = roundsFromEnv();
const RUNTIME = Number(process.env.RUNTIME ?? 8);
const SIZE = 1 << 30;
const pin = placement();
const CLI = path.join(__dirname, '..', '..', 'core', 'cli', 'main.js');

interface Workload {
  id: string;
  args: string[];
  /** Bytes per request, for CPU-µs per request. */
  bs: number;
}

const ALL_WORKLOADS: Workload[] = [
  { id: 'seqread', bs: 1 << 20, args: ['--rw=read', '--bs=1M', '--iodepth=8', '--ioengine=libaio'] },
  { id: 'rr32', bs: 4096, args: ['--rw=randread', '--bs=4k', '--iodepth=32', '--ioengine=libaio'] },
  { id: 'rr1', bs: 4096, args: ['--rw=randread', '--bs=4k', '--iodepth=1', '--ioengine=psync'] },
];

/** `ONLY=seqread,rr32` runs a subset. */
const WORKLOADS = process.env.ONLY ? ALL_WORKLOADS.filter((w) => process.env.ONLY!.split(',').includes(w.id)) : ALL_WORKLOADS;

interface Server {
  name: string;
  device: string;
  pids(): number[];
  stop(): Promise<void>;
}

const children = new Set<ChildProcess>();
const cleanups: Array<() => Promise<void>> = [];

function sh(cmd: string, args: string[], timeoutMs = 120_000): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(' ')}: ${stderr || err.message}`));
      else resolve(stdout);
    });
  });
}

async function waitFor(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function fill(device: string, content: string): Promise<void> {
  await sh('dd', [`if=${content}`, `of=${device}`, 'bs=1M', 'oflag=direct', 'status=none'], 600_000);
}

async function startTapkit(dir: string, content: string): Promise<Server> {
  const mnt = path.join(dir, 'tapkit');
  fs.mkdirSync(mnt);
  const proc = startProcess([...pin.server, process.execPath, CLI, 'mount', `memory:${SIZE}`, mnt, '--loop'], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.add(proc);
  let out = '';
  proc.stdout!.on('data', (d) => (out += d));
  await waitFor('tapkit mount', () => out.split('\n').filter(Boolean).length >= 2);
  const device = out.split('\n')[1];
  const stop = async () => {
    await sh(process.execPath, [CLI, 'unmount', mnt]).catch((e) => console.error(String(e)));
    await new Promise((r) => (proc.exitCode !== null ? r(null) : proc.on('exit', r)));
    children.delete(proc);
  };
  cleanups.push(stop);
  await fill(device, content);
  return { name: 'tapkit-fuse', device, pids: () => [proc.pid!], stop };
}

async function startNbdfuse(dir: string, content: string): Promise<Server> {
  const mnt = path.join(dir, 'nbdfuse');
  const sock = path.join(dir, 'nbdkit.sock');
  const pidfile = path.join(dir, 'nbdfuse.pid');
  fs.mkdirSync(mnt);
  const nbdkit = startProcess([...pin.server, 'nbdkit', '-f', '--exit-with-parent', '-U', sock, 'memory', String(SIZE)], { stdio: 'inherit' });
  children.add(nbdkit);
  await waitFor('nbdkit socket', () => fs.existsSync(sock));
  const nbdfuse = startProcess([...pin.server, 'nbdfuse', '-P', pidfile, path.join(mnt, 'nbd'), '--unix', sock], { stdio: 'inherit' });
  children.add(nbdfuse);
  await waitFor('nbdfuse', () => fs.existsSync(pidfile));
  const device = (await sh('losetup', ['--find', '--show', '--direct-io=on', path.join(mnt, 'nbd')])).trim();
  const stop = async () => {
    await sh('losetup', ['-d', device]).catch(() => {});
    await sh('fusermount3', ['-u', mnt]).catch(() => sh('umount', ['-l', mnt]).catch(() => {}));
    nbdkit.kill('SIGTERM');
    children.delete(nbdfuse);
    children.delete(nbdkit);
  };
  cleanups.push(stop);
  await fill(device, content);
  return { name: 'nbdkit+nbdfuse', device, pids: () => [nbdkit.pid!, nbdfuse.pid!], stop };
}

interface Cell {
  value: number;
  unit: string;
  cpuPerGiB: number;
  cpuUsPerReq: number;
  foreignPct: number;
  stealPct: number;
}

async function measure(server: Server, w: Workload): Promise<Cell> {
  waitQuiet(server.pids());
  const meter = startCpuMeter(server.pids());
  const out = await sh(
    pin.client[0] ?? 'env',
    [...pin.client.slice(1), 'timeout', String(RUNTIME + 60), 'fio', '--name=b', `--filename=${server.device}`, '--direct=1', '--time_based', `--runtime=${RUNTIME}`, '--ramp_time=1', '--output-format=json', ...w.args],
    (RUNTIME + 90) * 1000,
  );
  const cpu = meter();
  const serverCpu = cpu.serverSeconds;
  const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0].read;
  const bytes = job.io_bytes as number;
  const requests = job.total_ios as number;
  const mibps = job.bw_bytes / 2 ** 20;
  return {
    value: w.bs >= 1 << 20 ? mibps : job.iops,
    unit: w.bs >= 1 << 20 ? 'MiB/s' : 'IOPS',
    cpuPerGiB: bytes ? serverCpu / (bytes / 2 ** 30) : 0,
    cpuUsPerReq: requests ? (serverCpu * 1e6) / requests : 0,
    foreignPct: cpu.foreignPct,
    stealPct: cpu.stealPct,
  };
}

const fmt = (x: number, digits = 0) => x.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('run as root (mount, losetup)');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-bench-fuse-'));
  // Runs last (cleanups run in reverse): the mounts under it are gone by then; if one is
  // not, the directory is left rather than walked into.
  cleanups.push(async () => {
    if (!readMounts().some((m) => m.mountpoint.startsWith(`${dir}/`))) fs.rmSync(dir, { recursive: true, force: true });
  });
  const content = path.join('/dev/shm', `tapkit-bench-${process.pid}.bin`);
  cleanups.push(async () => fs.rmSync(content, { force: true }));
  console.log(`# FUSE export bench: ${ROUNDS} rounds × ${RUNTIME} s, ${pin.describe()}, ${os.cpus()[0]?.model}, ${os.release()}`);
  await sh('dd', ['if=/dev/urandom', `of=${content}`, 'bs=1M', `count=${SIZE >> 20}`, 'status=none'], 600_000);
  const servers = [await startTapkit(dir, content), await startNbdfuse(dir, content)];
  for (const s of servers) console.log(`# ${s.name}: ${s.device} (dio ${fs.readFileSync(`/sys/block/${path.basename(s.device)}/loop/dio`, 'utf8').trim()})`);
  const results = new Map<string, Cell[]>();
  for (let round = 1; round <= ROUNDS; round++) {
    for (const w of WORKLOADS) {
      for (const s of servers) {
        const cell = await measure(s, w);
        const key = `${w.id}|${s.name}`;
        results.set(key, [...(results.get(key) ?? []), cell]);
        console.log(`round ${round} ${w.id.padEnd(8)} ${s.name.padEnd(15)} ${fmt(cell.value).padStart(9)} ${cell.unit}  cpu ${fmt(cell.cpuPerGiB, 2)} s/GiB ${fmt(cell.cpuUsPerReq, 1)} µs/req  foreign ${fmt(cell.foreignPct)}% steal ${fmt(cell.stealPct)}%`);
      }
    }
  }
  console.log('\n| workload | tapkit FUSE (median, min–max) | nbdkit+nbdfuse | paired ratio (median, min–max) | CPU µs/req tapkit / nbdfuse | max foreign CPU |');
  console.log('|---|---|---|---|---|---|');
  for (const w of WORKLOADS) {
    const a = results.get(`${w.id}|tapkit-fuse`)!;
    const b = results.get(`${w.id}|nbdkit+nbdfuse`)!;
    const ratios = pairedRatios(a.map((x) => x.value), b.map((x) => x.value));
    const range = (xs: number[], d = 0) => `${fmt(median(xs), d)} (${fmt(Math.min(...xs), d)}–${fmt(Math.max(...xs), d)})`;
    const foreign = Math.max(...a.map((x) => x.foreignPct), ...b.map((x) => x.foreignPct));
    recordRatios({ bench: 'fuse', pair: 'tapkit FUSE / nbdkit+nbdfuse', workload: `${w.id} (${a[0].unit})`, ratios, maxForeignPct: foreign });
    console.log(
      `| ${w.id} ${a[0].unit} | ${range(a.map((x) => x.value))} | ${range(b.map((x) => x.value))} | ×${range(ratios, 2)} | ${fmt(median(a.map((x) => x.cpuUsPerReq)), 1)} / ${fmt(median(b.map((x) => x.cpuUsPerReq)), 1)} | ${fmt(foreign)}% |`,
    );
  }
}

async function cleanup(): Promise<void> {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
  for (const c of children) c.kill('SIGKILL');
}

process.on('SIGINT', () => void cleanup().then(() => process.exit(130)));
process.on('SIGTERM', () => void cleanup().then(() => process.exit(143)));
main()
  .catch((e) => {
    console.error(e instanceof Error ? e.message : e);
    process.exitCode = 1;
  })
  .finally(() => void cleanup());
