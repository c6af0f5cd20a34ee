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
import { type ChildProcess } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  benchWorkdir,
  measure,
  fioNbd, fmtRange, output as outputOf, placement, recordRatios, requireTools, run as runCommand, startNbdServer,
  roundsFromEnv, stopProcess, waitQuiet,
} from '../lib';

const ROUNDS = roundsFromEnv();
const RUNTIME = Number(process.env.RUNTIME ?? 8);
const SIZE_MIB = Number(process.env.SIZE_MIB ?? 1024);
const CLI = path.join(__dirname, '..', '..', 'core', 'cli', 'main.js');
const pin = placement();

const workdir = benchWorkdir('vhd');


const run = (cmd: string, args: string[], timeoutMs = 15 * 60_000): void => void runCommand([cmd, ...args], timeoutMs / 1000);
const cell = fmtRange;

// ---------------------------------------------------------------- servers

function startServer(label: string, args: string[], socket: string): ChildProcess {
  return startNbdServer(label, [...pin.server, ...args], socket);
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
  const side = fioNbd(socket, { rw: job.rw, bs: job.bs, iodepth: job.qd, size: `${SIZE_MIB}M`, runtime: RUNTIME }, pin.client);
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
  requireTools('qemu-img', 'qemu-nbd', 'fio', 'nbdinfo', 'taskset');
  console.log(`tapkit vhd bench: ${ROUNDS} rounds, ${os.cpus().length} CPUs (${os.cpus()[0]?.model}), node ${process.version}, ${outputOf(['qemu-nbd', '--version']).split('\n')[0]}`);
  console.log(`work directory: ${workdir}`);
  const original = makeImage();
  const servers: Record<string, (socket: string, image: string) => string[]> = {
    qemu: (socket, image) => ['qemu-nbd', '-t', '-e', '8', '-f', 'vpc', '-k', socket, image],
    tapkit: (socket, image) => [process.execPath, CLI, 'serve', '--quiet', '--socket', socket, `vhd:${image}`],
  };
  const values: Record<string, Record<string, number[]>> = {};
  const cpu: Record<string, Record<string, number[]>> = {};
  const ratios: Record<string, number[]> = {};
  const foreignByJob: Record<string, Record<string, number[]>> = {};
  for (let round = 0; round < ROUNDS; round++) {
    const order = round % 2 ? ['tapkit', 'qemu'] : ['qemu', 'tapkit'];
    const roundValues: Record<string, Record<string, number>> = {};
    for (const who of order) {
      const image = path.join(workdir, `${who}.vhd`);
      fs.copyFileSync(original, image);
      const socket = path.join(workdir, `${who}.sock`);
      fs.rmSync(socket, { force: true });
      const server = startServer(who, servers[who](socket, image), socket);
      const foreign = (foreignByJob[who] ??= {});
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
          (foreign[job.id] ??= []).push(sample.foreign);
          console.log(`  round ${round + 1} ${who} ${job.id}: ${value.toFixed(0)} ${job.metric === 'mibs' ? 'MiB/s' : 'IOPS'}, server CPU ${((sample.cpu / sample.seconds) * 100).toFixed(0)} %, foreign ${sample.foreign.toFixed(0)} %${sample.foreign > 25 ? ' (NOISY)' : ''}`);
        }
      } finally {
        stopProcess(server);
        fs.rmSync(image, { force: true });
      }
    }
    for (const job of JOBS) (ratios[job.id] ??= []).push(roundValues[job.id].tapkit / roundValues[job.id].qemu);
  }
  console.log(`\nserve over NBD (fio nbd engine; ${pin.describe()}; median (min–max)):`);
  for (const job of JOBS) {
    const unit = job.metric === 'mibs' ? 'MiB/s' : 'IOPS';
    console.log(`  ${job.id}: qemu-nbd ${cell(values[job.id].qemu)} ${unit} (CPU ${cell(cpu[job.id].qemu)} %), tapkit ${cell(values[job.id].tapkit)} ${unit} (CPU ${cell(cpu[job.id].tapkit)} %)`);
    console.log(`    ratio tapkit/qemu-nbd (paired per round): ${cell(ratios[job.id], 2)}${job.id.startsWith('seqread') ? '   target >= 0.80' : ''}`);
    recordRatios({
      bench: 'vhd', pair: 'tapkit vhd / qemu-nbd vpc', workload: `${job.id} (${unit})`, ratios: ratios[job.id],
      maxForeignPct: Math.max(...foreignByJob.tapkit[job.id], ...foreignByJob.qemu[job.id]), target: job.id.startsWith('seqread') ? '>= 0.80' : undefined,
    });
  }
}

main().catch((e) => {
  console.error(`bench failed: ${e instanceof Error ? e.message : String(e)}`);
  process.exitCode = 1;
});
