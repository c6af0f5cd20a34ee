/**
 * A VBD (virtual block device): one opened provider chain and the runtime around it.
 *
 * Every export talks to a VBD, never to a provider directly. The VBD
 *  - checks each request against the provider's info and capabilities first;
 *  - serializes calls when the provider does not allow them to overlap;
 *  - applies overlapping writes (write, trim, zero) in arrival order;
 *  - makes flush a barrier: it waits for every write that arrived before it;
 *  - holds new requests while paused, and releases them in arrival order;
 *  - counts operations, bytes, errors and latency;
 *  - turns anything a provider throws into a typed BlockError (EIO when untyped).
 */
import { BlockError, asBlockError } from './errors';
import type { Capabilities, DiskInfo, Extent, Provider, WriteOptions, ZeroOptions } from './provider';
import { LatencyHistogram, VbdStats, type Operation, type VbdStatsSnapshot } from './stats';

export interface VbdOptions {
  /** Serve read-only even if the provider can write. */
  readOnly?: boolean;
  /** A name for logs and stats (an export name, a device id). */
  name?: string;
}

interface WriteInFlight {
  start: number;
  end: number;
  done: Promise<unknown>;
}

/** Largest buffer the zero fallback writes at once. */
const ZERO_CHUNK = 1 << 20;

export class Vbd {
  readonly name: string;
  private provider: Provider;
  private diskInfo: DiskInfo;
  private caps: Capabilities;
  private readonly forcedReadOnly: boolean;
  private readonly counters = new VbdStats();

  private writesInFlight: WriteInFlight[] = [];
  private inFlight = 0;
  private idleWaiters: Array<() => void> = [];
  private paused = false;
  private held: Array<() => void> = [];
  /** Tail of the serialization chain when the provider is not concurrent. */
  private serialTail: Promise<unknown> = Promise.resolve();
  private closed = false;

  constructor(provider: Provider, options: VbdOptions = {}) {
    this.provider = provider;
    this.name = options.name ?? provider.name;
    this.forcedReadOnly = !!options.readOnly;
    this.diskInfo = this.effectiveInfo(provider);
    this.caps = this.effectiveCapabilities(provider);
  }

  private effectiveInfo(provider: Provider): DiskInfo {
    const info = provider.info();
    return Object.freeze({ ...info, readOnly: info.readOnly || this.forcedReadOnly });
  }

  private effectiveCapabilities(provider: Provider): Capabilities {
    const c = provider.capabilities();
    const writable = c.write && !this.diskInfo.readOnly && typeof provider.write === 'function';
    return Object.freeze({
      write: writable,
      flush: c.flush && typeof provider.flush === 'function',
      fua: writable && c.fua,
      trim: writable && c.trim && typeof provider.trim === 'function',
      // Zero is always possible on a writable disk: the VBD falls back to writing zeros.
      zero: writable,
      extents: c.extents && typeof provider.extents === 'function',
      multiConn: c.multiConn,
      concurrent: c.concurrent,
    });
  }

  /** The provider chain this VBD serves (for `tapkit info`, stats, snapshots). */
  get top(): Provider {
    return this.provider;
  }

  info(): DiskInfo {
    return this.diskInfo;
  }

  capabilities(): Capabilities {
    return this.caps;
  }

  /** True when the provider zeroes natively (NBD's FAST_ZERO may succeed). */
  get fastZero(): boolean {
    return this.caps.zero && this.provider.capabilities().zero && typeof this.provider.zero === 'function';
  }

  stats(): VbdStatsSnapshot {
    return this.counters.snapshot(this.inFlight, this.held.length, this.paused);
  }

  /** The latency histogram of one operation (for metrics exposition). */
  histogram(op: Operation): LatencyHistogram {
    return this.counters.histogram(op);
  }

  // ---- the operations -------------------------------------------------------------

  read(buf: Uint8Array, offset: number): Promise<void> {
    return this.run('read', buf.length, () => {
      this.checkRange(offset, buf.length, 'EINVAL');
      if (buf.length === 0) return undefined;
      return this.call(() => this.provider.read(buf, offset));
    });
  }

  /** True when the provider lends views of its memory for reads (Provider.readViews). */
  get lendsReads(): boolean {
    return typeof this.provider.readViews === 'function';
  }

  /**
   * A zero-copy read: the bytes at [offset, offset+length) as views of the provider's
   * memory, with the caveat of Provider.readViews. Where the provider lends nothing (it has
   * no readViews, e.g. swapped in by a snapshot meanwhile, or not for this range), the
   * range is read into `into()` (`length` bytes, e.g. a pooled buffer), or a fresh buffer.
   */
  readViews(offset: number, length: number, into?: () => Uint8Array): Promise<Uint8Array[]> {
    return this.run('read', length, () => {
      this.checkRange(offset, length, 'EINVAL');
      if (length === 0) return [];
      return this.call(async () => {
        const provider = this.provider;
        // Not awaited when the answer is already there (a declined random read stays cheap).
        const answer = provider.readViews?.(offset, length);
        const lent = answer instanceof Promise ? await answer : answer;
        if (lent) return lent;
        const buf = into?.() ?? new Uint8Array(length);
        await provider.read(buf, offset);
        return [buf];
      });
    });
  }

  /** Gives views from readViews back once nothing uses them (Provider.returnViews). */
  returnViews(views: readonly Uint8Array[]): void {
    this.provider.returnViews?.(views);
  }

  write(buf: Uint8Array, offset: number, options: WriteOptions = {}): Promise<void> {
    return this.run('write', buf.length, () => {
      this.checkWritable('write');
      this.checkRange(offset, buf.length, 'ENOSPC');
      const fua = this.fuaFor(options);
      if (buf.length === 0) return undefined;
      return this.ordered(offset, buf.length, fua, (nativeFua) => this.provider.write!(buf, offset, { fua: nativeFua }));
    });
  }

  flush(): Promise<void> {
    return this.run('flush', 0, async () => {
      // The barrier: every write that arrived before this flush completes first.
      const earlier = this.writesInFlight.map((w) => w.done);
      await Promise.allSettled(earlier);
      if (this.caps.flush) await this.call(() => this.provider.flush!());
    });
  }

  trim(offset: number, length: number, options: WriteOptions = {}): Promise<void> {
    return this.run('trim', length, () => {
      this.checkWritable('trim');
      if (!this.caps.trim) throw new BlockError('EOPNOTSUPP', `${this.provider.name} cannot trim`);
      this.checkRange(offset, length, 'ENOSPC');
      const fua = this.fuaFor(options);
      if (length === 0) return undefined;
      return this.ordered(offset, length, fua, (nativeFua) => this.provider.trim!(offset, length, { fua: nativeFua }));
    });
  }

  zero(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    return this.run('zero', length, () => {
      this.checkWritable('zero');
      this.checkRange(offset, length, 'ENOSPC');
      const fua = this.fuaFor(options);
      if (options.fast && !this.fastZero) throw new BlockError('EOPNOTSUPP', `${this.provider.name} cannot zero quickly`);
      if (length === 0) return undefined;
      return this.ordered(offset, length, fua, (nativeFua) =>
        this.fastZero
          ? this.provider.zero!(offset, length, { mayTrim: !!options.mayTrim, fua: nativeFua, fast: !!options.fast })
          : this.writeZeros(offset, length, nativeFua),
      );
    });
  }

  /** Allocation runs covering [offset, offset+length), clipped to that range and without gaps. */
  extents(offset: number, length: number): Promise<Extent[]> {
    return this.run('extents', 0, async () => {
      this.checkRange(offset, length, 'EINVAL');
      if (length === 0) return [];
      if (!this.caps.extents) return [{ offset, length, type: 'data' as const }];
      const runs = await this.call(() => this.provider.extents!(offset, length));
      return normalizeExtents(runs, offset, length, this.provider.name);
    });
  }

  /** Advisory prefetch (NBD CACHE): reads the range into the provider's caches, discarding the data. */
  cache(offset: number, length: number): Promise<void> {
    return this.run('cache', length, async () => {
      this.checkRange(offset, length, 'EINVAL');
      const chunk = new Uint8Array(Math.min(length, ZERO_CHUNK));
      for (let done = 0; done < length; done += chunk.length) {
        const view = chunk.subarray(0, Math.min(chunk.length, length - done));
        await this.call(() => this.provider.read(view, offset + done));
      }
    });
  }

  // ---- pause, resume, replace, close ----------------------------------------------

  /** Holds new requests and resolves once every request already started has finished. */
  async pause(): Promise<void> {
    this.paused = true;
    await this.idle();
  }

  /** Releases held requests in arrival order. */
  resume(): void {
    this.paused = false;
    const held = this.held;
    this.held = [];
    for (const start of held) start();
  }

  get isPaused(): boolean {
    return this.paused;
  }

  /**
   * Swaps in a new provider chain while paused (a live snapshot reopens on the child).
   * The old chain is returned, not closed: the caller decides.
   */
  replaceProvider(next: Provider): Provider {
    if (!this.paused || this.inFlight > 0) throw new BlockError('EBUSY', `VBD ${this.name} must be paused and idle to change its provider`);
    const old = this.provider;
    this.provider = next;
    this.diskInfo = this.effectiveInfo(next);
    this.caps = this.effectiveCapabilities(next);
    return old;
  }

  /** Serves held and in-flight requests, flushes if possible, closes the provider chain. */
  async close(): Promise<void> {
    if (this.closed) return;
    // Requests held by a pause are served, not dropped; anything arriving later is refused.
    this.paused = false;
    for (const start of this.held.splice(0)) start();
    this.closed = true;
    await this.idle();
    try {
      if (this.caps.flush && this.caps.write) await this.provider.flush!();
    } finally {
      await this.provider.close();
    }
  }

  // ---- internals ------------------------------------------------------------------

  private idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Admission (pause, closed), accounting and error typing around one request. */
  private run<T>(op: Operation, bytes: number, body: () => Promise<T> | T | undefined): Promise<T> {
    if (this.closed) return Promise.reject(new BlockError('ESHUTDOWN', `VBD ${this.name} is closed`));
    if (this.paused) {
      // Held requests restart synchronously, in arrival order, inside resume(): a request
      // arriving just after resume() cannot overtake them.
      return new Promise<T>((resolve, reject) => this.held.push(() => this.run(op, bytes, body).then(resolve, reject)));
    }
    this.inFlight++;
    const started = performance.now();
    // One promise per request (a then on the body's own promise), not an async function's
    // frame and promise on top of it: this runs for every request of every export.
    let result: Promise<T>;
    try {
      result = Promise.resolve(body() as T | Promise<T>);
    } catch (e) {
      result = Promise.reject(e);
    }
    return result.then(
      (value) => {
        this.finished(op, bytes, started, false);
        return value;
      },
      (e: unknown) => {
        this.finished(op, bytes, started, true);
        throw asBlockError(e, this.provider.name);
      },
    );
  }

  private finished(op: Operation, bytes: number, started: number, failed: boolean): void {
    this.counters.record(op, bytes, (performance.now() - started) * 1000, failed);
    if (--this.inFlight === 0) for (const wake of this.idleWaiters.splice(0)) wake();
  }

  /** Runs a provider call, one at a time when the provider does not allow overlap. */
  private call<T>(fn: () => Promise<T>): Promise<T> {
    if (this.caps.concurrent) return fn();
    const result = this.serialTail.then(fn, fn);
    this.serialTail = result.catch(() => {});
    return result;
  }

  /**
   * Runs a modifying call after every earlier modifying call that overlaps its range,
   * so overlapping writes land in arrival order; flushes arriving later wait for it.
   */
  private ordered(offset: number, length: number, fua: boolean, fn: (nativeFua: boolean) => Promise<void>): Promise<void> {
    const end = offset + length;
    const before = this.writesInFlight.filter((w) => w.start < end && offset < w.end).map((w) => w.done);
    // FUA on a provider without native FUA: the write, then a flush, before acknowledging.
    const nativeFua = fua && this.caps.fua;
    const flushAfter = fua && !this.caps.fua && this.caps.flush;
    const body = async () => {
      await fn(nativeFua);
      if (flushAfter) await this.provider.flush!();
    };
    const done = Promise.allSettled(before).then(() => this.call(body));
    const entry: WriteInFlight = { start: offset, end, done: done.catch(() => {}) };
    this.writesInFlight.push(entry);
    const remove = () => {
      this.writesInFlight = this.writesInFlight.filter((w) => w !== entry);
    };
    done.then(remove, remove);
    return done;
  }

  private async writeZeros(offset: number, length: number, fua: boolean): Promise<void> {
    const zeros = new Uint8Array(Math.min(length, ZERO_CHUNK));
    for (let done = 0; done < length; ) {
      const n = Math.min(zeros.length, length - done);
      const last = done + n === length;
      await this.provider.write!(zeros.subarray(0, n), offset + done, { fua: fua && last });
      done += n;
    }
  }

  private checkRange(offset: number, length: number, code: 'EINVAL' | 'ENOSPC'): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new BlockError('EINVAL', `invalid range: offset ${offset}, length ${length}`);
    }
    if (offset + length > this.diskInfo.size) {
      throw new BlockError(code, `range ${offset}+${length} is past the end of ${this.name} (size ${this.diskInfo.size})`);
    }
  }

  private checkWritable(op: string): void {
    if (this.diskInfo.readOnly) throw new BlockError('EROFS', `${this.name} is read-only (${op} refused)`);
    if (!this.caps.write) throw new BlockError('EROFS', `${this.provider.name} cannot write (${op} refused)`);
  }

  /** Whether a request asked for FUA (done natively, or as a flush after the write). */
  private fuaFor(options: WriteOptions): boolean {
    return !!options.fua;
  }
}

/** Clips a provider's extents to the asked range, checks they are contiguous, merges neighbours. */
export function normalizeExtents(runs: Extent[], offset: number, length: number, providerName: string): Extent[] {
  const end = offset + length;
  const out: Extent[] = [];
  let cursor = offset;
  for (const run of runs) {
    const runEnd = run.offset + run.length;
    if (runEnd <= cursor) continue;
    if (run.offset > cursor || run.length <= 0) {
      throw new BlockError('EIO', `${providerName}: extents leave a gap at ${cursor}`);
    }
    const stop = Math.min(runEnd, end);
    const prev = out[out.length - 1];
    if (prev && prev.type === run.type) prev.length += stop - cursor;
    else out.push({ offset: cursor, length: stop - cursor, type: run.type });
    cursor = stop;
    if (cursor >= end) break;
  }
  if (out.length === 0) throw new BlockError('EIO', `${providerName}: extents do not cover offset ${offset}`);
  return out;
}
