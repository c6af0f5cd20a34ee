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
import { type ChildProcess } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  benchWorkdir,
  measure,
  type Sample,
  fioNbd, fmtRange, output as outputOf, placement, recordRatios, requireTools, run as runCommand, startNbdServer,
  roundsFromEnv, stopProcess, waitQuiet,
} from '../lib';

const ROUNDS = roundsFromEnv();
const RUNTIME = Number(process.env.RUNTIME ?? 8);
const SIZE_MIB = Number(process.env.SIZE_MIB ?? 1024);
const CLUSTER = 64 * 1024;
const CLI = path.join(__dirname, '..', '..', 'core', 'cli', 'main.js');
const pin = placement();

const workdir = benchWorkdir('qcow2');

// ---------------------------------------------------------------- tools

/** The highest foreign CPU seen per cell (convert, or a serve job id), for the summary's noise flag. */
const maxForeign: Record<string, number> = {};

const run = (cmd: string, args: string[], timeoutMs = 15 * 60_000): void => void runCommand([cmd, ...args], timeoutMs / 1000);
const output = (cmd: string, args: string[]): string => outputOf([cmd, ...args]);
const cell = fmtRange;

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
    qemu: [...pin.server, 'qemu-img', 'convert', '-f', 'qcow2', '-O', 'raw', image, out],
    tapkit: [...pin.server, process.execPath, CLI, 'convert', `qcow2:${image}`, out],
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
      maxForeign.convert = Math.max(maxForeign.convert ?? 0, sample.foreign);
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
  const perGiB = (s: Sample[]) => s.map((x) => x.cpu / (SIZE_MIB / 1024));
  console.log(`  qemu-img convert: ${cell(mibs(results.qemu))}   CPU-s per GiB ${cell(perGiB(results.qemu), 2)}`);
  console.log(`  tapkit convert:   ${cell(mibs(results.tapkit))}   CPU-s per GiB ${cell(perGiB(results.tapkit), 2)}`);
  console.log(`  ratio tapkit/qemu (speed, paired per round): ${cell(ratios, 2)}   target >= 0.70`);
  const cpuRatios = results.qemu.map((q, i) => q.cpu / results.tapkit[i].cpu);
  console.log(`  ratio tapkit/qemu (CPU efficiency, qemu CPU-s / tapkit CPU-s per round): ${cell(cpuRatios, 2)}\n`);
  recordRatios({ bench: 'qcow2', pair: 'tapkit convert / qemu-img convert', workload: 'convert to raw (MiB/s)', ratios, maxForeignPct: maxForeign.convert ?? 0, target: '>= 0.70' });
}

// ---------------------------------------------------------------- 2. serve

async function startServer(label: string, args: string[], socket: string): Promise<ChildProcess | undefined> {
  try {
    return startNbdServer(label, [...pin.server, ...args], socket);
  } catch (e) {
    console.log(`  ${label} did not start: ${e instanceof Error ? e.message : String(e)}`);
    return undefined;
  }
}

function stopServer(child: ChildProcess): void {
  stopProcess(child);
}

interface FioResult {
  mibs: number;
  iops: number;
}

function fio(socket: string, rw: string, bs: string, qd: number): FioResult {
  const side = fioNbd(socket, { rw: rw as 'read' | 'randread', bs, iodepth: qd, size: `${SIZE_MIB}M`, runtime: RUNTIME }, pin.client);
  return { mibs: side.bw_bytes / 2 ** 20, iops: side.iops };
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
  const cost: Record<string, Record<string, number[]>> = {};
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
          // Server CPU per unit of work: µs per request (4k) or CPU-s per GiB (1M).
          const work = job.metric === 'iops' ? result!.iops * sample.seconds : (result!.mibs * sample.seconds) / 1024;
          ((cost[job.id] ??= {})[who] ??= []).push(job.metric === 'iops' ? (sample.cpu * 1e6) / work : sample.cpu / work);
          (roundValues[job.id] ??= {})[who] = value;
          maxForeign[job.id] = Math.max(maxForeign[job.id] ?? 0, sample.foreign);
          console.log(`  serve round ${round + 1} ${who} ${job.id}: ${value.toFixed(0)} ${job.metric === 'mibs' ? 'MiB/s' : 'IOPS'}, server CPU ${((sample.cpu / sample.seconds) * 100).toFixed(0)} %, foreign ${sample.foreign.toFixed(0)} %${sample.foreign > 25 ? ' (NOISY)' : ''}`);
        }
      } finally {
        stopServer(server);
        await new Promise((r) => setTimeout(r, 300));
      }
    }
    for (const job of jobs) (ratios[job.id] ??= []).push(roundValues[job.id].tapkit / roundValues[job.id].qemu);
  }
  console.log(`\nserve over NBD (fio nbd engine; ${pin.describe()}; median (min–max)):`);
  for (const job of jobs) {
    const unit = job.metric === 'mibs' ? 'MiB/s' : 'IOPS';
    console.log(`  ${job.id}: qemu-nbd ${cell(values[job.id].qemu)} ${unit} (CPU ${cell(cpu[job.id].qemu)} %), tapkit ${cell(values[job.id].tapkit)} ${unit} (CPU ${cell(cpu[job.id].tapkit)} %)`);
    const costUnit = job.metric === 'iops' ? 'CPU-µs per request' : 'CPU-s per GiB';
    console.log(`    server ${costUnit}: qemu-nbd ${cell(cost[job.id].qemu, job.metric === 'iops' ? 0 : 2)}, tapkit ${cell(cost[job.id].tapkit, job.metric === 'iops' ? 0 : 2)}`);
    console.log(`    ratio tapkit/qemu (paired per round): ${cell(ratios[job.id], 2)}   target >= 0.70`);
    recordRatios({ bench: 'qcow2', pair: 'tapkit serve / qemu-nbd', workload: `${job.id} (${unit})`, ratios: ratios[job.id], maxForeignPct: maxForeign[job.id] ?? 0, target: '>= 0.70' });
  }
}

async function main(): Promise<void> {
  requireTools('qemu-img', 'qemu-nbd', 'fio', 'nbdinfo', 'taskset', 'cmp');
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
