/**
 * The provider conformance suite: the checks every provider passes, built-in or not.
 *
 *   import test from 'ava';
 *   import { runConformance } from 'tapkit/conformance';   // in this repo: './conformance'
 *   runConformance(test, { name: 'mine', open: () => 'mine:64M' });
 *
 * `open` is called once per test and gives a fresh disk: a spec string (opened through the
 * registry, so `--plugin`-style registration is exercised) or a Provider instance. The disk
 * must be at least 1 MiB. Every request goes through a `Vbd`, as it does in every export, so
 * the suite checks the provider as the runtime uses it.
 *
 * Registered tests: info and capabilities are coherent; reads are stable and unaligned
 * reads agree with aligned ones; written data reads back; unaligned and block-crossing I/O;
 * zero then read; trim then read; extents agree with the data; flush and FUA; out-of-range
 * and read-only refusals (typed BlockError codes); concurrent overlapping writes end in the
 * order they were issued; close releases every file descriptor.
 */
import * as fs from 'node:fs';
import type { ExecutionContext, TestFn } from 'ava';
import { Opener } from '../core/open';
import type { Extent, Provider } from '../core/provider';
import { Vbd } from '../core/vbd';

export interface ConformanceTarget {
  /** Shown in every test title. */
  name: string;
  /**
   * A fresh disk for one test. `readOnly` asks for a read-only open; a spec string is opened
   * with `new Opener({ readOnly })`, a Provider you return must honour it itself.
   */
  open: (options: { readOnly: boolean }) => Promise<Provider | string> | Provider | string;
  /** The disk cannot be written at all (a pattern, a remote image): the write tests are left out. */
  readOnly?: boolean;
  /** What a fresh disk holds at [offset, offset + length), when the suite can know it. */
  expected?: (offset: number, length: number) => Uint8Array;
  /** After trim the range reads as zeros (default). false: each byte reads either as before or as zero. */
  trimReadsZeros?: boolean;
  /** Count /proc/self/fd around open and close (default: on Linux). */
  checkFds?: boolean;
}

type Test = TestFn<unknown>;
type T = ExecutionContext<unknown>;

const KiB = 1024;
const MiB = 1024 * KiB;
/** The part of the disk the data tests work in. */
const WORK = MiB;

export function runConformance(test: Test, target: ConformanceTarget): void {
  const title = (what: string) => `conformance ${target.name}: ${what}`;
  const writable = !target.readOnly;

  test(title('info and capabilities are coherent'), async (t) => {
    const vbd = await openVbd(t, target);
    const p = vbd.top;
    const info = p.info();
    t.true(Number.isSafeInteger(info.size) && info.size >= WORK, `size ${info.size} is a whole number of at least 1 MiB`);
    for (const key of ['logicalBlockSize', 'physicalBlockSize'] as const) {
      const v = info[key];
      t.true(Number.isInteger(v) && v > 0 && (v & (v - 1)) === 0, `${key} ${v} is a power of two`);
    }
    t.is(typeof info.readOnly, 'boolean');
    const caps = p.capabilities();
    for (const key of ['write', 'flush', 'fua', 'trim', 'zero', 'extents', 'multiConn', 'concurrent'] as const) {
      t.is(typeof caps[key], 'boolean', `capability ${key} is a boolean`);
    }
    for (const op of ['write', 'flush', 'trim', 'zero', 'extents'] as const) {
      if (caps[op]) t.is(typeof p[op], 'function', `capability ${op} comes with a ${op}() method`);
    }
    t.is(typeof p.name, 'string');
    t.is(vbd.capabilities().write, writable, writable ? 'the disk is writable' : 'the disk is read-only, as declared');
  });

  test(title('reads are stable and unaligned reads agree with aligned ones'), async (t) => {
    const vbd = await openVbd(t, target);
    const whole = new Uint8Array(WORK);
    await vbd.read(whole, 0);
    const again = new Uint8Array(WORK);
    await vbd.read(again, 0);
    sameBytes(t, again, whole, 'a second read of the first MiB');
    if (target.expected) sameBytes(t, whole, target.expected(0, WORK), 'the first MiB against the expected contents');
    const random = rng(1);
    for (const window of [...boundaryWindows(), ...randomWindows(random, 40)]) {
      const buf = new Uint8Array(window.length);
      await vbd.read(buf, window.offset);
      sameBytes(t, buf, whole.subarray(window.offset, window.offset + window.length), `read ${window.offset}+${window.length}`);
    }
    // The very end of the disk, unaligned.
    const size = vbd.info().size;
    const tail = new Uint8Array(4097);
    await vbd.read(tail, size - tail.length);
    if (target.expected) sameBytes(t, tail, target.expected(size - tail.length, tail.length), 'the last 4097 bytes');
    const tailPart = new Uint8Array(1000);
    await vbd.read(tailPart, size - 1000);
    sameBytes(t, tailPart, tail.subarray(tail.length - 1000), 'the last 1000 bytes read on their own');
  });

  test(title('flush succeeds, with and without earlier writes'), async (t) => {
    const vbd = await openVbd(t, target);
    await t.notThrowsAsync(vbd.flush());
    if (!writable) return;
    const data = randomBytes(rng(2), 8 * KiB);
    await vbd.write(data, 12345);
    await vbd.flush();
    await vbd.write(data.subarray(0, 4096), 300 * KiB, { fua: true });
    const back = new Uint8Array(8 * KiB);
    await vbd.read(back, 12345);
    sameBytes(t, back, data, 'data written before a flush');
    const fuaBack = new Uint8Array(4096);
    await vbd.read(fuaBack, 300 * KiB);
    sameBytes(t, fuaBack, data.subarray(0, 4096), 'a FUA write');
  });

  test(title('out-of-range requests are refused with typed errors'), async (t) => {
    const vbd = await openVbd(t, target);
    const size = vbd.info().size;
    const before = new Uint8Array(4096);
    await vbd.read(before, size - 4096);
    await rejectsWith(t, vbd.read(new Uint8Array(512), size), 'EINVAL', 'a read at the end');
    await rejectsWith(t, vbd.read(new Uint8Array(4096), size - 512), 'EINVAL', 'a read straddling the end');
    await rejectsWith(t, vbd.read(new Uint8Array(512), -512), 'EINVAL', 'a read at a negative offset');
    await rejectsWith(t, vbd.read(new Uint8Array(512), 0.5), 'EINVAL', 'a read at a fractional offset');
    await rejectsWith(t, vbd.extents(size, 1), 'EINVAL', 'extents past the end');
    const writeCode = writable ? 'ENOSPC' : 'EROFS';
    await rejectsWith(t, vbd.write(new Uint8Array(4096).fill(0xaa), size - 512), writeCode, 'a write straddling the end');
    if (writable) {
      await rejectsWith(t, vbd.zero(size - 512, 4096), 'ENOSPC', 'a zero straddling the end');
      await rejectsWith(t, vbd.write(new Uint8Array(512), -512), 'EINVAL', 'a write at a negative offset');
    }
    const after = new Uint8Array(4096);
    await vbd.read(after, size - 4096);
    sameBytes(t, after, before, 'the last 4 KiB after the refused requests');
  });

  test(title('a read-only disk refuses every change with EROFS'), async (t) => {
    const vbd = await openVbd(t, target, { readOnly: true });
    t.true(vbd.info().readOnly, 'info says read-only');
    t.false(vbd.capabilities().write, 'capabilities say no write');
    const before = new Uint8Array(64 * KiB);
    await vbd.read(before, 0);
    await rejectsWith(t, vbd.write(new Uint8Array(4096).fill(1), 0), 'EROFS', 'a write');
    await rejectsWith(t, vbd.zero(0, 4096), 'EROFS', 'a zero');
    await rejectsWith(t, vbd.trim(0, 4096), 'EROFS', 'a trim');
    const after = new Uint8Array(64 * KiB);
    await vbd.read(after, 0);
    sameBytes(t, after, before, 'the data after the refused changes');
    // A VBD forced read-only over a disk opened for writing refuses the same way.
    if (writable) {
      const forced = await openVbd(t, target, { vbdReadOnly: true });
      await rejectsWith(t, forced.write(new Uint8Array(512), 0), 'EROFS', 'a write through a read-only VBD');
    }
  });

  test(title('extents cover the disk in order and agree with the data'), async (t) => {
    const vbd = await openVbd(t, target);
    const size = vbd.info().size;
    if (writable) {
      const random = rng(3);
      await vbd.write(randomBytes(random, 100 * KiB), 70 * KiB);
      await vbd.write(randomBytes(random, 3000), 700 * KiB + 17);
      await vbd.zero(100 * KiB, 20 * KiB);
      if (vbd.capabilities().trim) await vbd.trim(512 * KiB, 128 * KiB);
      await vbd.write(randomBytes(random, 4096), size - 4096);
    }
    const runs = await allExtents(vbd, 0, size);
    let cursor = 0;
    for (const run of runs) {
      t.is(run.offset, cursor, `extent at ${run.offset} follows the previous one`);
      t.true(run.length > 0 && ['data', 'zero', 'hole'].includes(run.type), `extent ${JSON.stringify(run)} is well formed`);
      cursor = run.offset + run.length;
    }
    t.is(cursor, size, 'extents cover the whole disk');
    // Every byte in a zero or hole extent reads as zero (huge runs are sampled at both ends).
    for (const run of runs.filter((r) => r.type !== 'data')) {
      for (const window of sampleWindows(run, 2 * MiB)) {
        const buf = new Uint8Array(window.length);
        await vbd.read(buf, window.offset);
        t.true(isZero(buf), `the ${run.type} run at ${run.offset}+${run.length} reads as zeros at ${window.offset}`);
      }
    }
    // A query starting in the middle agrees with the whole-disk answer, clipped.
    const mid = await allExtents(vbd, 70 * KiB + 1, 64 * KiB);
    for (const run of mid) {
      const outer = runs.find((r) => r.offset <= run.offset && run.offset < r.offset + r.length)!;
      if (run.type !== 'data') t.not(outer.type, 'data', `run at ${run.offset} agrees with the whole-disk extents`);
    }
    // The provider itself answers in order and covers the asked offset (the contract).
    if (vbd.capabilities().extents) {
      const direct = await vbd.top.extents!(4096 + 3, 256 * KiB);
      t.true(direct.length > 0 && direct[0].offset <= 4099 && direct[0].offset + direct[0].length > 4099, 'the first run covers the asked offset');
    }
  });

  if (!writable) {
    // Serial: descriptors opened by other tests running at the same time would blur the count.
    test.serial(title('close releases every file descriptor and later requests are refused'), closeTest(target));
    return;
  }

  test(title('written data reads back'), async (t) => {
    const vbd = await openVbd(t, target);
    const random = rng(4);
    const writes: Array<[number, Uint8Array]> = [
      [0, randomBytes(random, 512)],
      [4096, randomBytes(random, 4096)],
      [64 * KiB, randomBytes(random, 64 * KiB)],
      [256 * KiB, randomBytes(random, 512 * KiB)],
    ];
    for (const [offset, data] of writes) await vbd.write(data, offset);
    for (const [offset, data] of writes) {
      const back = new Uint8Array(data.length);
      await vbd.read(back, offset);
      sameBytes(t, back, data, `${data.length} bytes written at ${offset}`);
    }
  });

  test(title('unaligned and block-crossing writes and reads match a model'), async (t) => {
    const vbd = await openVbd(t, target);
    const model = new Uint8Array(WORK);
    await vbd.read(model, 0);
    const random = rng(5);
    const windows = [...boundaryWindows(), ...randomWindows(random, 60)];
    for (const w of windows) {
      const data = randomBytes(random, w.length);
      await vbd.write(data, w.offset);
      model.set(data, w.offset);
    }
    const whole = new Uint8Array(WORK);
    await vbd.read(whole, 0);
    sameBytes(t, whole, model, 'the first MiB after unaligned writes');
    for (const w of randomWindows(random, 30)) {
      const buf = new Uint8Array(w.length);
      await vbd.read(buf, w.offset);
      sameBytes(t, buf, model.subarray(w.offset, w.offset + w.length), `read ${w.offset}+${w.length}`);
    }
    // Unaligned I/O ending exactly at the end of the disk.
    const size = vbd.info().size;
    const tail = randomBytes(random, 5000);
    await vbd.write(tail, size - 5000);
    const back = new Uint8Array(5001);
    await vbd.read(back, size - 5001);
    sameBytes(t, back.subarray(1), tail, 'a write ending at the end of the disk');
  });

  test(title('zero then read gives zeros and leaves the neighbours alone'), async (t) => {
    const vbd = await openVbd(t, target);
    const random = rng(6);
    const model = randomBytes(random, WORK);
    await vbd.write(model, 0);
    const ranges: Array<[number, number, { mayTrim?: boolean; fua?: boolean }]> = [
      [1000, 3000, {}],
      [8 * KiB, 64 * KiB, { mayTrim: true }],
      [200 * KiB + 7, 300 * KiB, { mayTrim: true }],
      [600 * KiB - 1, 2, { fua: true }],
    ];
    for (const [offset, length, options] of ranges) {
      await vbd.zero(offset, length, options);
      model.fill(0, offset, offset + length);
    }
    // A fast zero either zeroes or refuses with EOPNOTSUPP and changes nothing.
    try {
      await vbd.zero(800 * KiB, 64 * KiB, { fast: true });
      model.fill(0, 800 * KiB, 864 * KiB);
    } catch (e) {
      t.is((e as { code?: string }).code, 'EOPNOTSUPP', 'a fast zero that cannot be done is refused with EOPNOTSUPP');
    }
    const whole = new Uint8Array(WORK);
    await vbd.read(whole, 0);
    sameBytes(t, whole, model, 'the first MiB after zeroing');
  });

  test(title('trim then read'), async (t) => {
    const vbd = await openVbd(t, target);
    const random = rng(7);
    const model = randomBytes(random, WORK);
    await vbd.write(model, 0);
    if (!vbd.capabilities().trim) {
      await rejectsWith(t, vbd.trim(0, 4096), 'EOPNOTSUPP', 'trim on a provider without trim');
      return;
    }
    const old = model.slice();
    const ranges: Array<[number, number]> = [
      [0, 64 * KiB],
      [100 * KiB + 3, 50 * KiB],
      [WORK - 4097, 4097],
    ];
    for (const [offset, length] of ranges) {
      await vbd.trim(offset, length);
      model.fill(0, offset, offset + length);
    }
    const whole = new Uint8Array(WORK);
    await vbd.read(whole, 0);
    if (target.trimReadsZeros ?? true) {
      sameBytes(t, whole, model, 'the first MiB after trim');
    } else {
      const bad = whole.findIndex((b, i) => b !== model[i] && b !== old[i]);
      t.is(bad, -1, 'every byte reads either as before the trim or as zero');
    }
  });

  test(title('concurrent overlapping writes end in the order they were issued'), async (t) => {
    const vbd = await openVbd(t, target);
    const random = rng(8);
    const region = 256 * KiB;
    const model = new Uint8Array(region);
    await vbd.read(model, 0);
    const pending: Array<Promise<void>> = [];
    for (let i = 0; i < 24; i++) {
      const offset = Math.floor(random() * (region - 1));
      const length = 1 + Math.floor(random() * Math.min(96 * KiB, region - offset - 1));
      if (i % 5 === 4) {
        pending.push(vbd.zero(offset, length));
        model.fill(0, offset, offset + length);
      } else {
        const fill = 1 + (i % 250);
        pending.push(vbd.write(new Uint8Array(length).fill(fill), offset));
        model.fill(fill, offset, offset + length);
      }
    }
    // Reads and a flush mixed in must not disturb the order either.
    pending.push(vbd.flush(), vbd.read(new Uint8Array(4096), 1000));
    await Promise.all(pending);
    const back = new Uint8Array(region);
    await vbd.read(back, 0);
    sameBytes(t, back, model, 'the first 256 KiB after overlapping writes (each byte from the last request covering it)');
  });

  // Serial: descriptors opened by other tests running at the same time would blur the count.
  test.serial(title('close releases every file descriptor and later requests are refused'), closeTest(target));
}

function closeTest(target: ConformanceTarget) {
  return async (t: T) => {
    const checkFds = (target.checkFds ?? process.platform === 'linux') && fs.existsSync('/proc/self/fd');
    const before = checkFds ? openFds() : [];
    const provider = await openProvider(target, false);
    const vbd = new Vbd(provider);
    const buf = new Uint8Array(4096);
    await vbd.read(buf, 0);
    if (!target.readOnly) {
      await vbd.write(buf, 4096);
      await vbd.flush();
    }
    await vbd.close();
    await rejectsWith(t, vbd.read(buf, 0), 'ESHUTDOWN', 'a read after close');
    if (checkFds) {
      // Descriptors are closed by the time close() resolves; allow the event loop a few turns.
      let after = openFds();
      for (let i = 0; i < 20 && after.length > before.length; i++) {
        await new Promise((r) => setTimeout(r, 50));
        after = openFds();
      }
      t.deepEqual(after.filter((fd) => !before.includes(fd)).map(fdTarget), [], 'no file descriptor left open');
    } else {
      t.pass('file descriptors not checked on this platform');
    }
  };
}

// ---- helpers ------------------------------------------------------------------------

async function openProvider(target: ConformanceTarget, readOnly: boolean): Promise<Provider> {
  const made = await target.open({ readOnly });
  return typeof made === 'string' ? new Opener({ readOnly }).open(made) : made;
}

/** Opens a fresh disk behind a VBD that the test's teardown closes. */
async function openVbd(t: T, target: ConformanceTarget, options: { readOnly?: boolean; vbdReadOnly?: boolean } = {}): Promise<Vbd> {
  const provider = await openProvider(target, !!options.readOnly);
  const vbd = new Vbd(provider, { readOnly: options.vbdReadOnly });
  t.teardown(() => vbd.close());
  return vbd;
}

async function allExtents(vbd: Vbd, offset: number, length: number): Promise<Extent[]> {
  const out: Extent[] = [];
  const end = offset + length;
  for (let cursor = offset; cursor < end; ) {
    const runs = await vbd.extents(cursor, end - cursor);
    for (const run of runs) {
      const last = out[out.length - 1];
      if (last && last.type === run.type && last.offset + last.length === run.offset) last.length += run.length;
      else out.push({ ...run });
    }
    cursor = runs[runs.length - 1].offset + runs[runs.length - 1].length;
  }
  return out;
}

async function rejectsWith(t: T, promise: Promise<unknown>, code: string, what: string): Promise<void> {
  try {
    await promise;
    t.fail(`${what} succeeded; expected ${code}`);
  } catch (e) {
    t.is((e as { name?: string }).name, 'BlockError', `${what} fails with a BlockError (got ${String(e)})`);
    t.is((e as { code?: string }).code, code, `${what} fails with ${code}`);
  }
}

function sameBytes(t: T, actual: Uint8Array, expected: Uint8Array, what: string): void {
  if (actual.length === expected.length && Buffer.compare(actual, expected) === 0) {
    t.pass(what);
    return;
  }
  const at = actual.findIndex((b, i) => b !== expected[i]);
  t.fail(`${what}: lengths ${actual.length}/${expected.length}, first difference at byte ${at} (got ${actual[at]}, want ${expected[at]})`);
}

function isZero(buf: Uint8Array): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

/** A small deterministic generator (mulberry32), so a failure repeats. */
function rng(seed: number): () => number {
  let a = seed * 0x9e3779b9;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let x = Math.imul(a ^ (a >>> 15), 1 | a);
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

function randomBytes(random: () => number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = 1 + Math.floor(random() * 255);
  return out;
}

/** Windows straddling sector, page and 64 KiB boundaries inside the first MiB. */
function boundaryWindows(): Array<{ offset: number; length: number }> {
  return [
    { offset: 511, length: 2 },
    { offset: 1, length: 511 },
    { offset: 4095, length: 4098 },
    { offset: 3 * 4096 - 100, length: 200 },
    { offset: 64 * KiB - 1, length: 3 },
    { offset: 128 * KiB - 700, length: 65 * KiB },
    { offset: 512 * KiB + 13, length: 130 * KiB },
    { offset: WORK - 1, length: 1 },
  ];
}

function randomWindows(random: () => number, count: number): Array<{ offset: number; length: number }> {
  const out: Array<{ offset: number; length: number }> = [];
  for (let i = 0; i < count; i++) {
    const offset = Math.floor(random() * (WORK - 1));
    const max = Math.min(WORK - offset, i % 3 === 0 ? 200 * KiB : 9000);
    out.push({ offset, length: 1 + Math.floor(random() * max) });
  }
  return out;
}

/** The whole run when it is small, else its first and last `limit / 2` bytes. */
function sampleWindows(run: Extent, limit: number): Array<{ offset: number; length: number }> {
  if (run.length <= limit) return [{ offset: run.offset, length: run.length }];
  const half = limit / 2;
  return [
    { offset: run.offset, length: half },
    { offset: run.offset + run.length - half, length: half },
  ];
}

function openFds(): number[] {
  return fs.readdirSync('/proc/self/fd').map(Number);
}

function fdTarget(fd: number): string {
  try {
    return `${fd} -> ${fs.readlinkSync(`/proc/self/fd/${fd}`)}`;
  } catch {
    return `${fd}`;
  }
}
