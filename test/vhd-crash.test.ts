/**
 * Crash consistency: a writer process runs a random stream of writes and zeros (some with
 * FUA, flushes in between) on a VHD and is killed with SIGKILL at a random moment, many
 * times over the same image. After every kill the image opens, `tapkit vhd check` finds
 * nothing wrong (qemu-img reads it too), every op completed before the last completed
 * flush reads back, and so does every acknowledged FUA op; each byte that a later,
 * unacknowledged op touched holds either its old value or a value one of those ops wrote.
 */
import test, { type ExecutionContext } from 'ava';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Opener } from '../core/open';
import { checkImage } from '../providers/vhd/check';
import { createImage } from '../providers/vhd/create';
import type { VhdProvider } from '../providers/vhd/provider';
import { snapshotVhd } from '../providers/vhd/snapshot';
import { crashStream, firstDisallowedByte, MAX_UNFLUSHED, type CrashOp, type CrashPoint } from './helpers/vhd-crash-stream';
import { firstDifference, openSpec, prng, qemuRaw, tapkitRaw } from './helpers/vhd';
import { must } from './helpers/run';
import { fileTempDir } from './helpers/temp';

const dir = fileTempDir('tapkit-vhd-crash-');
const WRITER = path.join(__dirname, 'helpers', 'vhd-crash-writer.js');
const MiB = 2 ** 20;

interface Run extends CrashPoint {
  /** The writer's stdout, kept for the report of a failure. */
  log: string;
}

function parseRun(out: string): Run {
  const run: Run = { lastStart: -1, lastFlushed: -1, acked: new Set(), log: out };
  for (const line of out.split('\n')) {
    const [word, n] = line.split(' ');
    if (word === 'start') run.lastStart = Number(n);
    else if (word === 'flushed') run.lastFlushed = Number(n);
    else if (word === 'acked') run.acked.add(Number(n));
  }
  return run;
}

/** Runs the writer until `delayMs` after it is ready, then SIGKILLs it. */
function runAndKill(spec: string, seed: number, delayMs: number): Promise<Run> {
  return new Promise((resolve, reject) => {
    const logPath = path.join(fs.mkdtempSync(path.join(dir, 'log-')), 'writer.log');
    const child = spawn(process.execPath, [WRITER, spec, String(seed), logPath], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let timer: NodeJS.Timeout | undefined;
    // Nothing may hang: a writer that never gets ready is killed too.
    const guard = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (!timer && out.startsWith('ready\n')) timer = setTimeout(() => child.kill('SIGKILL'), delayMs);
    });
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', reject);
    // 'close', not 'exit': only then has every line the writer wrote been read.
    child.on('close', (code, signal) => {
      clearTimeout(guard);
      if (timer) clearTimeout(timer);
      if (signal !== 'SIGKILL') return reject(new Error(`writer exited with ${code ?? signal} before the kill: ${err}`));
      if (!out.startsWith('ready\n')) return reject(new Error(`writer killed before it was ready: ${err}`));
      resolve(parseRun(fs.readFileSync(logPath, 'utf8')));
    });
  });
}

/**
 * Asserts that the disk after the kill is one the run allows. On a failure the image, its
 * parent and the writer's log are kept, with where the byte lies (block, sector, bit, parent).
 */
async function verify(t: ExecutionContext, image: string, before: Buffer, actual: Buffer, ops: CrashOp[], run: Run): Promise<void> {
  const bad = firstDisallowedByte(before, actual, ops, run);
  const unflushed = run.lastStart - run.lastFlushed;
  if (bad === -1) return void t.pass();
  const keep = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-vhd-crash-failure-'));
  for (const f of fs.readdirSync(path.dirname(image))) if (f.endsWith('.vhd')) fs.copyFileSync(path.join(path.dirname(image), f), path.join(keep, f));
  fs.writeFileSync(path.join(keep, 'writer.log'), run.log);
  fs.writeFileSync(path.join(keep, 'before.raw'), before);
  const vhd = (await openSpec(`vhd:${image}`)) as VhdProvider;
  try {
    const block = Math.floor(bad / vhd.blockSize);
    const sector = Math.floor((bad % vhd.blockSize) / 512);
    const parentByte = Buffer.alloc(1);
    if (vhd.backing) await vhd.backing.read(parentByte, bad);
    const touching = ops.flatMap((op, i) => (bad >= op.offset && bad < op.offset + op.length ? [`${i}:${op.kind}${op.fua ? '+fua' : ''}@${op.offset}+${op.length}`] : []));
    t.log(`byte ${bad}: block ${block}, sector ${sector}, bit ${(await vhd.sectorPresent(block, sector)) ? 1 : 0}, parent ${vhd.backing ? parentByte[0] : '-'}; reads ${actual[bad]}, before the run ${before[bad]}; ops touching it ${touching.join(' ') || 'none'}; kept in ${keep}`);
  } finally {
    await vhd.close();
  }
  t.fail(`byte ${bad} after a kill (last start ${run.lastStart}, last flush ${run.lastFlushed}, ${unflushed} unflushed ops)`);
}

async function crashRounds(t: ExecutionContext, image: string, rounds: number, seedBase: number, qemuToo: boolean): Promise<void> {
  const delays = prng(seedBase);
  let before = await tapkitRaw(`vhd:${image}`);
  let totalOps = 0;
  for (let round = 0; round < rounds; round++) {
    const seed = seedBase * 1000 + round;
    const run = await runAndKill(`vhd:${image}`, seed, 20 + Math.floor(delays() * 600));
    totalOps += run.lastStart + 1;
    const ops: CrashOp[] = [];
    const stream = crashStream(seed, before.length);
    for (let i = 0; i <= run.lastStart; i++) ops.push(stream.next().value as CrashOp);
    const report = await checkImage(image);
    t.deepEqual(report.problems, [], `round ${round}: tapkit vhd check after the kill`);
    const actual = await tapkitRaw(`vhd:${image}`);
    t.is(actual.length, before.length);
    await verify(t, image, before, actual, ops, run);
    t.true(run.lastStart - run.lastFlushed <= MAX_UNFLUSHED);
    before = actual;
  }
  t.true(totalOps > rounds, `the writers issued ${totalOps} ops in ${rounds} rounds`);
}

test('a dynamic VHD survives SIGKILL during a write stream, again and again', async (t) => {
  const image = path.join(dir, 'dynamic.vhd');
  createImage(image, { size: 8 * MiB, type: 'dynamic', blockSize: 512 * 1024 });
  await crashRounds(t, image, 12, 1, true);
});

test('a differencing VHD survives SIGKILL during a write stream, again and again', async (t) => {
  const base = path.join(dir, 'base.vhd');
  await must('qemu-img', ['create', '-q', '-f', 'vpc', base, '8M']);
  await must('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x2b 0 3M', '-c', 'write -P 0x2c 5M 2M', base]);
  const child = path.join(dir, 'child.vhd');
  await snapshotVhd(base, child, { blockSize: 1 << 20 });
  await crashRounds(t, child, 10, 2, false);
});

test('coalesce killed at random moments leaves a chain that reads the same; run again, it completes', async (t) => {
  const parent = path.join(dir, 'co-parent.vhd');
  await must('qemu-img', ['create', '-q', '-f', 'vpc', '-o', 'force_size=on', parent, '48M']);
  await must('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x5c 0 20M', parent]);
  const child = path.join(dir, 'co-child.vhd');
  await snapshotVhd(parent, child, { blockSize: 512 * 1024 });
  // Scattered writes all over the child: many blocks for the merge to copy.
  const w = await new Opener({ readOnly: false }).open(`vhd:${child}`);
  const next = prng(99);
  for (let i = 0; i < 120; i++) {
    const len = Math.floor(next() * 300_000) + 1;
    const at = Math.floor(next() * (48 * MiB - len));
    await w.write!(Buffer.alloc(len, 1 + Math.floor(next() * 250)), at, {});
  }
  await w.close();
  const chain = await tapkitRaw(`vhd:${child}`);
  const cli = path.join(__dirname, '..', 'core', 'cli', 'main.js');
  let killed = 0;
  for (let round = 0; round < 4; round++) {
    const started = Date.now();
    const co = spawn(process.execPath, [cli, 'vhd', 'coalesce', child], { stdio: 'ignore' });
    const delay = 150 + Math.floor(next() * 600);
    const timer = setTimeout(() => co.kill('SIGKILL'), delay);
    const guard = setTimeout(() => co.kill('SIGKILL'), 60_000);
    const [code, signal] = await new Promise<[number | null, string | null]>((resolve) => co.on('exit', (c, s) => resolve([c, s])));
    clearTimeout(timer);
    clearTimeout(guard);
    if (signal === 'SIGKILL') killed++;
    else t.is(code, 0, `coalesce finished on its own after ${Date.now() - started} ms`);
    t.deepEqual((await checkImage(parent)).problems, [], `round ${round}: the parent is sound`);
    t.is(firstDifference(await tapkitRaw(`vhd:${child}`), chain), -1, `round ${round}: the chain reads as before`);
  }
  t.log(`${killed} of 4 coalesce runs were killed mid-way`);
  const done = spawn(process.execPath, [cli, 'vhd', 'coalesce', child], { stdio: 'ignore' });
  const code = await new Promise<number | null>((resolve) => done.on('exit', (c) => resolve(c)));
  t.is(code, 0);
  t.is(firstDifference(await qemuRaw(parent, dir), chain), -1, 'the merged parent reads as the chain did');
});
