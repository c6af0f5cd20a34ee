/**
 * The VBD's own guarantees, proved with a provider that records every call it receives and
 * can be made to hold a call until the test releases it.
 */
import test from 'ava';
import { BlockError } from '../core/errors';
import type { Capabilities, DiskInfo, Extent, Provider, WriteOptions, ZeroOptions } from '../core/provider';
import { LatencyHistogram } from '../core/stats';
import { Vbd } from '../core/vbd';

interface Call {
  op: string;
  offset?: number;
  length?: number;
  fua?: boolean;
}

/** A promise the test resolves by hand. */
function deferred(): { promise: Promise<void>; release: () => void } {
  let release!: () => void;
  const promise = new Promise<void>((resolve) => (release = resolve));
  return { promise, release };
}

const tick = () => new Promise((resolve) => setImmediate(resolve));

/** An in-memory provider that records calls, counts overlap and can hold calls at a gate. */
class Recorder implements Provider {
  readonly name = 'recorder';
  readonly calls: Call[] = [];
  readonly finished: Call[] = [];
  readonly data: Uint8Array;
  active = 0;
  maxActive = 0;
  /** When set, every call waits for it before touching data. */
  gate?: Promise<void>;
  /** Per-call delay in milliseconds (by call number), to shuffle completion order. */
  delay?: (n: number) => number;
  /** Throws this from the next read, then behaves. */
  failNextRead?: unknown;
  private readonly caps: Capabilities;

  constructor(
    size = 1 << 20,
    caps: Partial<Capabilities> = {},
    private readonly readOnly = false,
  ) {
    this.data = new Uint8Array(size);
    this.caps = { write: true, flush: true, fua: true, trim: true, zero: true, extents: true, multiConn: false, concurrent: true, ...caps };
  }

  info(): DiskInfo {
    return { size: this.data.length, logicalBlockSize: 512, physicalBlockSize: 4096, readOnly: this.readOnly };
  }

  capabilities(): Capabilities {
    return this.caps;
  }

  private async enter(call: Call): Promise<void> {
    const n = this.calls.length;
    this.calls.push(call);
    this.active++;
    this.maxActive = Math.max(this.maxActive, this.active);
    if (this.gate) await this.gate;
    const ms = this.delay?.(n) ?? 0;
    await (ms > 0 ? new Promise((r) => setTimeout(r, ms)) : tick());
  }

  private leave(call: Call): void {
    this.active--;
    this.finished.push(call);
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    const call = { op: 'read', offset, length: buf.length };
    await this.enter(call);
    try {
      if (this.failNextRead !== undefined) {
        const e = this.failNextRead;
        this.failNextRead = undefined;
        throw e;
      }
      buf.set(this.data.subarray(offset, offset + buf.length));
    } finally {
      this.leave(call);
    }
  }

  async write(buf: Uint8Array, offset: number, options: WriteOptions): Promise<void> {
    const call = { op: 'write', offset, length: buf.length, fua: !!options.fua };
    await this.enter(call);
    this.data.set(buf, offset);
    this.leave(call);
  }

  async flush(): Promise<void> {
    const call = { op: 'flush' };
    await this.enter(call);
    this.leave(call);
  }

  async trim(offset: number, length: number): Promise<void> {
    const call = { op: 'trim', offset, length };
    await this.enter(call);
    this.data.fill(0, offset, offset + length);
    this.leave(call);
  }

  async zero(offset: number, length: number, options: ZeroOptions): Promise<void> {
    const call = { op: 'zero', offset, length, fua: !!options.fua };
    await this.enter(call);
    this.data.fill(0, offset, offset + length);
    this.leave(call);
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    const call = { op: 'extents', offset, length };
    await this.enter(call);
    this.leave(call);
    return [{ offset, length, type: 'data' }];
  }

  async close(): Promise<void> {
    this.calls.push({ op: 'close' });
  }
}

async function refused(promise: Promise<unknown>, code: string): Promise<string> {
  try {
    await promise;
  } catch (e) {
    if (!(e instanceof BlockError)) throw new Error(`expected a BlockError, got ${String(e)}`);
    if (e.code !== code) throw new Error(`expected ${code}, got ${e.code}: ${e.message}`);
    return e.message;
  }
  throw new Error(`expected ${code}, but the request succeeded`);
}

test('requests are validated before the provider sees them', async (t) => {
  const p = new Recorder(1 << 20, { trim: false });
  const vbd = new Vbd(p);
  const size = 1 << 20;
  await refused(vbd.read(new Uint8Array(512), size), 'EINVAL');
  await refused(vbd.read(new Uint8Array(1024), size - 512), 'EINVAL');
  await refused(vbd.read(new Uint8Array(1), -1), 'EINVAL');
  await refused(vbd.read(new Uint8Array(1), Number.NaN), 'EINVAL');
  await refused(vbd.read(new Uint8Array(1), 2 ** 60), 'EINVAL');
  await refused(vbd.write(new Uint8Array(1024), size - 512), 'ENOSPC');
  await refused(vbd.write(new Uint8Array(1), 1.5), 'EINVAL');
  await refused(vbd.zero(size, 1), 'ENOSPC');
  await refused(vbd.zero(0, -5), 'EINVAL');
  await refused(vbd.trim(0, 512), 'EOPNOTSUPP');
  await refused(vbd.extents(size - 1, 2), 'EINVAL');
  await refused(vbd.cache(size, 1), 'EINVAL');
  t.deepEqual(p.calls, [], 'the provider saw none of the refused requests');

  const readOnly = new Vbd(new Recorder(), { readOnly: true });
  const inner = readOnly.top as Recorder;
  await refused(readOnly.write(new Uint8Array(512), 0), 'EROFS');
  await refused(readOnly.zero(0, 512), 'EROFS');
  await refused(readOnly.trim(0, 512), 'EROFS');
  t.deepEqual(inner.calls, [], 'a read-only VBD passes no change on');

  const providerReadOnly = new Vbd(new Recorder(1 << 20, {}, true));
  await refused(providerReadOnly.write(new Uint8Array(512), 0), 'EROFS');
  t.deepEqual((providerReadOnly.top as Recorder).calls, []);

  // Zero-length requests inside the disk succeed without reaching the provider.
  await vbd.read(new Uint8Array(0), size);
  await vbd.write(new Uint8Array(0), 0);
  t.deepEqual(p.calls, []);
});

test('a provider that does not allow overlap sees one call at a time', async (t) => {
  const serial = new Recorder(1 << 20, { concurrent: false });
  serial.delay = (n) => n % 3;
  const vbd = new Vbd(serial);
  const ops: Array<Promise<unknown>> = [];
  for (let i = 0; i < 30; i++) {
    const offset = (i % 7) * 4096;
    if (i % 3 === 0) ops.push(vbd.write(new Uint8Array(4096).fill(i), offset));
    else if (i % 3 === 1) ops.push(vbd.read(new Uint8Array(4096), offset));
    else ops.push(i % 2 ? vbd.flush() : vbd.extents(offset, 4096));
  }
  await Promise.all(ops);
  t.is(serial.maxActive, 1, 'never more than one call in the provider');
  t.is(serial.finished.length, 30);

  // The same load on a concurrent provider does overlap: the check above can fail.
  const concurrent = new Recorder(1 << 20, { concurrent: true });
  concurrent.delay = (n) => n % 3;
  const vbd2 = new Vbd(concurrent);
  await Promise.all(Array.from({ length: 10 }, (_, i) => vbd2.read(new Uint8Array(512), i * 512)));
  t.true(concurrent.maxActive > 1, 'a concurrent provider gets overlapping calls');
});

test('overlapping writes are applied in arrival order; others are not held back', async (t) => {
  const p = new Recorder();
  // The first write is the slowest: without ordering, later writes would land first.
  p.delay = (n) => (n === 0 ? 60 : n === 1 ? 30 : 0);
  const vbd = new Vbd(p);
  const first = vbd.write(new Uint8Array(8192).fill(1), 0);
  const second = vbd.write(new Uint8Array(4096).fill(2), 4096);
  const third = vbd.zero(6144, 1024);
  const elsewhere = vbd.write(new Uint8Array(512).fill(9), 65536);
  await Promise.all([first, second, third, elsewhere]);
  const expected = new Uint8Array(8192).fill(1);
  expected.fill(2, 4096);
  expected.fill(0, 6144, 7168);
  t.deepEqual(p.data.subarray(0, 8192), expected);
  t.deepEqual(
    p.finished.filter((c) => c.offset !== 65536).map((c) => c.op + c.offset),
    ['write0', 'write4096', 'zero6144'],
    'overlapping requests finished in arrival order',
  );
  t.is(p.finished[0].offset, 65536, 'the write elsewhere did not wait for the slow ones');
});

test('flush waits for every write that arrived before it', async (t) => {
  const p = new Recorder();
  const gate = deferred();
  p.gate = gate.promise;
  const vbd = new Vbd(p);
  const write = vbd.write(new Uint8Array(4096).fill(7), 0);
  await tick(); // the write is now inside the provider, held at the gate
  t.deepEqual(p.calls.map((c) => c.op), ['write']);
  let flushed = false;
  const flush = vbd.flush().then(() => (flushed = true));
  p.gate = undefined; // calls arriving from now on pass; the held write still waits
  await tick();
  await tick();
  t.deepEqual(p.calls.map((c) => c.op), ['write'], 'the provider has not been asked to flush yet');
  t.false(flushed);
  gate.release();
  await Promise.all([write, flush]);
  t.deepEqual(p.finished.map((c) => c.op), ['write', 'flush'], 'the flush ran after the write completed');
});

test('FUA is passed on natively, or becomes a flush after the write', async (t) => {
  const native = new Recorder(1 << 20, { fua: true });
  await new Vbd(native).write(new Uint8Array(512), 0, { fua: true });
  t.deepEqual(native.finished, [{ op: 'write', offset: 0, length: 512, fua: true }]);

  const fallback = new Recorder(1 << 20, { fua: false });
  const vbd = new Vbd(fallback);
  await vbd.write(new Uint8Array(512), 0, { fua: true });
  t.deepEqual(fallback.finished.map((c) => [c.op, c.fua]), [['write', false], ['flush', undefined]], 'write without FUA, then flush');
  fallback.finished.length = 0;
  await vbd.zero(0, 512, { fua: true });
  t.deepEqual(fallback.finished.map((c) => c.op), ['zero', 'flush']);
  fallback.finished.length = 0;
  await vbd.write(new Uint8Array(512), 0);
  t.deepEqual(fallback.finished.map((c) => c.op), ['write'], 'no flush without FUA');
});

test('zero falls back to writing zeros; a fast zero is refused when it cannot be fast', async (t) => {
  const p = new Recorder(4 << 20, { zero: false });
  p.data.fill(0xee);
  const vbd = new Vbd(p);
  t.true(vbd.capabilities().zero, 'a writable VBD always zeroes');
  t.false(vbd.fastZero);
  await vbd.zero(100, 3 << 20);
  t.true(p.calls.every((c) => c.op === 'write'), 'zeros were written');
  t.is(p.data.subarray(100, 100 + (3 << 20)).findIndex((b) => b !== 0), -1);
  t.is(p.data[99], 0xee);
  t.is(p.data[100 + (3 << 20)], 0xee);
  await refused(vbd.zero(0, 512, { fast: true }), 'EOPNOTSUPP');
});

test('pause holds new requests, waits for those in flight, and resume releases them in order', async (t) => {
  const p = new Recorder();
  const gate = deferred();
  p.gate = gate.promise;
  const vbd = new Vbd(p);
  const inFlight = vbd.write(new Uint8Array(4096).fill(1), 0);
  await tick();
  let paused = false;
  const pausing = vbd.pause().then(() => (paused = true));
  p.gate = undefined;
  const held = [
    vbd.write(new Uint8Array(4096).fill(2), 0),
    vbd.read(new Uint8Array(512), 8192),
    vbd.write(new Uint8Array(2048).fill(3), 1024),
    vbd.flush(),
  ];
  await tick();
  t.false(paused, 'pause waits for the request in flight');
  t.is(vbd.stats().queued, 4, 'four requests are held');
  t.is(vbd.stats().inFlight, 1);
  gate.release();
  await pausing;
  await tick();
  t.deepEqual(p.calls.map((c) => c.op), ['write'], 'nothing held reached the provider while paused');
  vbd.resume();
  // Arrives right after resume: it must not overtake the held requests.
  const late = vbd.write(new Uint8Array(512).fill(4), 1536);
  await Promise.all([inFlight, ...held, late]);
  const name = (c: Call) => `${c.op}${c.offset ?? ''}`;
  t.deepEqual(
    p.calls.filter((c) => c.op === 'write').map(name),
    ['write0', 'write0', 'write1024', 'write1536'],
    'held writes reached the provider in arrival order, before the late one',
  );
  t.true(p.calls.some((c) => c.op === 'read'), 'the held read was served');
  const done = p.finished.map(name);
  t.true(done.lastIndexOf('flush') > done.indexOf('write1024'), 'the held flush came after the writes held before it');
  const expected = new Uint8Array(4096).fill(2);
  expected.fill(3, 1024, 3072);
  expected.fill(4, 1536, 2048);
  t.deepEqual(p.data.subarray(0, 4096), expected, 'none lost, none reordered');
});

test('close serves held requests, then refuses new ones', async (t) => {
  const p = new Recorder();
  const vbd = new Vbd(p);
  await vbd.pause();
  const held = vbd.write(new Uint8Array(512).fill(5), 0);
  await vbd.close();
  await held;
  t.is(p.data[0], 5, 'the held write was served');
  t.deepEqual(p.calls.map((c) => c.op), ['write', 'flush', 'close']);
  await refused(vbd.read(new Uint8Array(1), 0), 'ESHUTDOWN');
});

test('counters and the latency histogram', async (t) => {
  const p = new Recorder();
  p.delay = () => 2;
  const vbd = new Vbd(p);
  for (let i = 0; i < 5; i++) await vbd.write(new Uint8Array(1000), i * 1000);
  for (let i = 0; i < 3; i++) await vbd.read(new Uint8Array(4096), 0);
  await vbd.flush();
  await vbd.read(new Uint8Array(1), 2 << 20).catch(() => {});
  const s = vbd.stats();
  t.is(s.operations.write.count, 5);
  t.is(s.operations.write.bytes, 5000);
  t.is(s.operations.read.count, 4);
  t.is(s.operations.read.bytes, 3 * 4096, 'failed requests add no bytes');
  t.is(s.operations.read.errors, 1);
  t.is(s.operations.flush.count, 1);
  t.is(s.operations.trim.count, 0);
  t.true(s.operations.write.latency.p50 >= 1024, 'a 2 ms write lands in a bucket of at least 1024 µs');
  t.true(s.operations.write.latency.p50 <= s.operations.write.latency.p99);
  t.true(s.operations.write.latency.max >= 1000);
  t.deepEqual([s.inFlight, s.queued, s.paused], [0, 0, false]);

  const h = new LatencyHistogram();
  for (const us of [0.5, 3, 3, 3, 100, 5000]) h.record(us);
  t.is(h.total, 6);
  t.is(h.counts[0], 1, 'below 1 µs');
  t.is(h.counts[2], 3, '3 µs is in [2, 4)');
  t.is(h.percentile(50), 4);
  t.is(h.percentile(100), 8192);
  t.is(new LatencyHistogram().percentile(99), 0);
});

test('an untyped throw becomes EIO naming the provider, and the VBD keeps serving', async (t) => {
  const p = new Recorder();
  p.data.fill(6, 0, 512);
  const vbd = new Vbd(p);
  p.failNextRead = new Error('kaboom');
  const message = await refused(vbd.read(new Uint8Array(512), 0), 'EIO');
  t.regex(message, /recorder/, 'names the provider');
  t.regex(message, /kaboom/, 'keeps the original message');
  p.failNextRead = 'a string';
  await refused(vbd.read(new Uint8Array(512), 0), 'EIO');
  p.failNextRead = new BlockError('ENOSPC', 'typed');
  await refused(vbd.read(new Uint8Array(512), 0), 'ENOSPC');
  const buf = new Uint8Array(512);
  await vbd.read(buf, 0);
  t.is(buf[0], 6, 'the next read works');
  t.is(vbd.stats().operations.read.errors, 3);
});

test('a BlockError from another copy of tapkit keeps its code and message', async (t) => {
  const p = new Recorder();
  const vbd = new Vbd(p);
  // What a plugin bundling its own tapkit throws: the same shape, another class.
  class ForeignBlockError extends Error {
    override readonly name = 'BlockError';
    constructor(readonly code: string, message: string) {
      super(message);
    }
  }
  p.failNextRead = new ForeignBlockError('ENOSPC', 'out of room elsewhere');
  const error = await t.throwsAsync(vbd.read(new Uint8Array(1), 0));
  t.is((error as unknown as { code: string }).code, 'ENOSPC');
  t.is(error!.message, 'out of room elsewhere');
});

test('readViews reads into a fresh buffer when the provider lends nothing', async (t) => {
  const p = new Recorder();
  p.data.fill(5, 1000, 3000);
  const vbd = new Vbd(p);
  t.false(vbd.lendsReads);
  const views = await vbd.readViews(999, 2002);
  t.is(views.length, 1);
  t.deepEqual([...views[0].subarray(0, 3)], [0, 5, 5]);
  t.is(views[0][2001], 0);
  t.is(views[0][2000], 5);
  await t.throwsAsync(vbd.readViews(1 << 20, 1), { code: 'EINVAL' });
});

test('readViews: a provider that lends only some ranges has the rest read into the caller\'s buffer; views go back to it', async (t) => {
  const p = new Recorder();
  p.data.fill(7, 0, 8192);
  const lentViews = [p.data.subarray(0, 4096)];
  const returned: Array<readonly Uint8Array[]> = [];
  // Lends its first 4 KiB (after a turn of the event loop), nothing else.
  Object.assign(p, {
    readViews: async (offset: number, length: number) => (offset === 0 && length === 4096 ? lentViews : undefined),
    returnViews: (views: readonly Uint8Array[]) => returned.push(views),
  });
  const vbd = new Vbd(p);
  t.true(vbd.lendsReads);
  let given = 0;
  const into = () => {
    given++;
    return new Uint8Array(4096);
  };
  t.is(await vbd.readViews(0, 4096, into), lentViews);
  t.is(given, 0, 'a lent range needs no buffer of the caller');
  const read = await vbd.readViews(4096, 4096, into);
  t.is(given, 1);
  t.is(read.length, 1);
  t.is(read[0][0], 7);
  t.is(p.calls.filter((c) => c.op === 'read').length, 1, 'the declined range was read with read()');
  vbd.returnViews(lentViews);
  t.deepEqual(returned, [lentViews]);
});
