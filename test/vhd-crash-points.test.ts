/**
 * Crash consistency without timing: every write, zero and flush the VHD provider sends to
 * its file is recorded while a write stream runs on a differencing (and a dynamic) image.
 * A process killed at any moment leaves the file as a prefix of those calls (the page
 * cache keeps what completed), so the test rebuilds the image after every prefix and
 * checks it there: `tapkit vhd check` finds nothing wrong and the disk reads as the
 * stream allows (every op before the last completed flush, every acknowledged FUA op; the
 * others old or new, byte by byte). This visits each kill point the timed SIGKILL test
 * (vhd-crash.test.ts) can only hit by chance.
 */
import test, { type ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import '../providers';
import { Opener } from '../core/open';
import type { Provider, WriteOptions, ZeroOptions } from '../core/provider';
import { Vbd } from '../core/vbd';
import { checkImage } from '../providers/vhd/check';
import { createImage } from '../providers/vhd/create';
import { snapshotVhd } from '../providers/vhd/snapshot';
import { crashStream, firstDisallowedByte, type CrashOp } from './helpers/vhd-crash-stream';
import { prng, tapkitRaw } from './helpers/vhd';
import { must } from './helpers/run';
import { fileTempDir } from './helpers/temp';

const dir = fileTempDir('tapkit-vhd-points-');
const MiB = 2 ** 20;

/** One call the provider made on its file: bytes written, or a range zeroed. */
type FileCall = { offset: number; data: Buffer } | { offset: number; zeros: number };

/** What the stream did, in file calls: where each op and each flush began and ended. */
interface Recording {
  calls: FileCall[];
  opStart: number[];
  opEnd: number[];
  /** The number of file calls made when the flush after op i returned. */
  flushEnd: Map<number, number>;
}

/** Wraps the raw provider under `vhd` so that every change it makes to the file is recorded. */
function recordCalls(lower: Provider, calls: FileCall[]): void {
  const write = lower.write!.bind(lower);
  const zero = lower.zero!.bind(lower);
  const trim = lower.trim?.bind(lower);
  lower.write = async (buf: Uint8Array, offset: number, options: WriteOptions) => {
    await write(buf, offset, options);
    calls.push({ offset, data: Buffer.from(buf) });
  };
  lower.zero = async (offset: number, length: number, options: ZeroOptions) => {
    await zero(offset, length, options);
    calls.push({ offset, zeros: length });
  };
  if (trim) {
    lower.trim = async (offset: number, length: number, options: WriteOptions) => {
      await trim(offset, length, options);
      calls.push({ offset, zeros: length });
    };
  }
}

async function record(image: string, seed: number, count: number, size: number): Promise<{ ops: CrashOp[]; rec: Recording }> {
  const provider = await new Opener({ readOnly: false, warn: () => {} }).open(`vhd:${image}`);
  const rec: Recording = { calls: [], opStart: [], opEnd: [], flushEnd: new Map() };
  recordCalls(provider.lower!, rec.calls);
  const vbd = new Vbd(provider);
  const ops: CrashOp[] = [];
  const stream = crashStream(seed, size);
  for (let i = 0; i < count; i++) {
    const op = stream.next().value as CrashOp;
    ops.push(op);
    rec.opStart.push(rec.calls.length);
    if (op.kind === 'write') await vbd.write(op.data!, op.offset, { fua: op.fua });
    else await vbd.zero(op.offset, op.length, { fua: op.fua, mayTrim: true });
    rec.opEnd.push(rec.calls.length);
    if (op.flushAfter) {
      await vbd.flush();
      rec.flushEnd.set(i, rec.calls.length);
    }
  }
  // Not closed through vhd (that would flush): the recording ends where the stream did.
  await provider.lower!.close();
  await provider.backing?.close();
  return { ops, rec };
}

/** Applies a file call to the copy as the kernel would have left it (zeroing never grows the file). */
function replay(fd: number, call: FileCall): void {
  if ('data' in call) {
    fs.writeSync(fd, call.data, 0, call.data.length, call.offset);
    return;
  }
  const end = Math.min(call.offset + call.zeros, fs.fstatSync(fd).size);
  if (end > call.offset) fs.writeSync(fd, Buffer.alloc(end - call.offset), 0, end - call.offset, call.offset);
}

/** The crash point after the first `done` file calls: which ops had started, which flush had ended. */
function pointAfter(rec: Recording, ops: CrashOp[], done: number) {
  // Op i may have started once every call before its first one completed (it may have made none yet).
  let lastStart = -1;
  while (lastStart + 1 < ops.length && rec.opStart[lastStart + 1] <= done) lastStart++;
  let lastFlushed = -1;
  const acked = new Set<number>();
  for (let i = 0; i <= lastStart; i++) {
    const end = rec.flushEnd.get(i);
    if (end !== undefined && end <= done) lastFlushed = i;
    if (ops[i].fua && rec.opEnd[i] <= done) acked.add(i);
  }
  return { lastStart, lastFlushed, acked };
}

/**
 * Runs `sessions` writers on the image one after another; each is "killed" after a chosen
 * file call (the next one opens what it left), and every prefix of its calls is checked.
 */
async function everyCrashPoint(t: ExecutionContext, image: string, seed: number, count: number, sessions: number): Promise<void> {
  const crashed = path.join(path.dirname(image), `crashed-${path.basename(image)}`);
  const pristine = `${image}.pristine`;
  const cuts = prng(seed);
  for (let session = 0; session < sessions; session++) {
    fs.copyFileSync(image, pristine);
    const before = await tapkitRaw(`vhd:${image}`);
    const { ops, rec } = await record(image, seed * 100 + session, count, before.length);
    t.true(rec.calls.length > count, `${rec.calls.length} file calls for ${count} ops`);
    // Where this session's writer dies; the last session runs to its end.
    const cut = session === sessions - 1 ? rec.calls.length : Math.floor(cuts() * rec.calls.length);
    // The crashed image lies next to the original, so a child finds its parent the same way.
    fs.copyFileSync(pristine, crashed);
    const fd = fs.openSync(crashed, 'r+');
    try {
      for (let done = 0; done <= rec.calls.length; done++) {
        if (done > 0) replay(fd, rec.calls[done - 1]);
        if (done === cut) fs.copyFileSync(crashed, image);
        const where = `session ${session}, killed after file call ${done} of ${rec.calls.length}`;
        const report = await checkImage(crashed);
        t.deepEqual(report.problems, [], `${where}: tapkit vhd check`);
        const point = pointAfter(rec, ops, done);
        const actual = await tapkitRaw(`vhd:${crashed}`);
        const bad = firstDisallowedByte(before, actual, ops, point);
        if (bad !== -1) {
          t.fail(`${where} (last start ${point.lastStart}, last flush ${point.lastFlushed}): byte ${bad} reads ${actual[bad]}`);
          return;
        }
      }
    } finally {
      fs.closeSync(fd);
    }
  }
}

test('a differencing VHD killed after any file call reads as the write stream allows', async (t) => {
  const base = path.join(dir, 'points-base.vhd');
  await must('qemu-img', ['create', '-q', '-f', 'vpc', base, '8M']);
  await must('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x2b 0 3M', '-c', 'write -P 0x2c 5M 2M', base]);
  const child = path.join(dir, 'points-child.vhd');
  await snapshotVhd(base, child, { blockSize: 1 << 20 });
  await everyCrashPoint(t, child, 7, 24, 2);
});

test('a dynamic VHD killed after any file call reads as the write stream allows', async (t) => {
  const image = path.join(dir, 'points-dynamic.vhd');
  createImage(image, { size: 8 * MiB, type: 'dynamic', blockSize: 512 * 1024 });
  await everyCrashPoint(t, image, 8, 24, 2);
});
