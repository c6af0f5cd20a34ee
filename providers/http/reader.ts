/**
 * Turns the reads a disk receives into range requests:
 *  - at most `maxInFlight` requests at once; reads waiting for a slot that touch end to
 *    end are merged into one request (up to `maxRequest` bytes);
 *  - a run of sequential reads starts readahead: the next `readahead` bytes are fetched in
 *    chunks of `chunkSize` before they are asked for. `lend` hands out views of those
 *    chunks (no copy: the NBD server sends them as they are); `read` copies from them for
 *    small reads, while its reads of half a chunk or more go straight to the server
 *    (readahead would only add a copy).
 * A merged request fills its readers' buffers straight, one after the other (no scratch
 * buffer, no copy). Reads the disk was asked for go before readahead chunks waiting for a
 * slot: a guest never waits behind a guess. It knows nothing of HTTP: `fetch(targets,
 * offset)` fills buffers.
 *
 * Chunk buffers are reused (a fresh buffer of megabytes per chunk cost more in garbage
 * collection than the whole HTTP exchange). A buffer goes back to the spare list only when
 * all of these hold: its chunk left the readahead window, its request settled (nothing
 * writes into it any more), and every view of it that was lent has been given back
 * (`giveBack`) and every copy out of it is done. Views never given back keep their buffer
 * out of reuse; the garbage collector takes it once nothing holds them.
 */

/** Fills `targets`, one after the other, with the bytes from `offset` on. */
export type FetchRange = (targets: readonly Uint8Array[], offset: number) => Promise<void>;

export interface ReaderOptions {
  size: number;
  maxInFlight: number;
  /** Largest merged request. */
  maxRequest: number;
  /** Bytes fetched ahead of a sequential reader (0: no readahead). */
  readahead: number;
  /** Bytes per readahead request (default 1 MiB; at most `readahead`). */
  chunkSize?: number;
}

interface Job {
  offset: number;
  target: Uint8Array;
  /** Readahead chunks are already large: they are fetched alone, straight into their buffer. */
  alone: boolean;
  resolve(): void;
  reject(e: unknown): void;
}

interface Chunk {
  index: number;
  buf: Uint8Array;
  ready: Promise<void>;
  /** Its request finished, well or not: nothing writes into `buf` any more. */
  settled: boolean;
  /** No longer in the readahead window. */
  dropped: boolean;
  /** Lent views not given back yet, and copies running out of it. */
  pins: number;
  /** Its buffer went back to the spare list (it may belong to another chunk now). */
  recycled: boolean;
}

/** Sequential reads in a row before readahead starts. */
const SEQUENTIAL_RUN = 2;
/** Spare chunk buffers kept for reuse, beyond the window. */
const SPARE_CHUNKS = 4;

export class RangeReader {
  /** Reads asked for, waiting for a slot (served first). */
  private queue: Job[] = [];
  /** Readahead chunks waiting for a slot. */
  private aheadQueue: Job[] = [];
  private inFlight = 0;
  private pumpScheduled = false;
  private readonly chunkSize: number;
  private readonly chunks = new Map<number, Chunk>();
  /** The chunk behind each buffer that was lent, to recognise views given back. */
  private readonly lentFrom = new WeakMap<ArrayBufferLike, Chunk>();
  private readonly spare: Uint8Array[] = [];
  private lastStart = -1;
  private lastEnd = -1;
  private sequentialRun = 0;

  constructor(
    private readonly fetch: FetchRange,
    private readonly options: ReaderOptions,
  ) {
    this.chunkSize = Math.max(4096, Math.min(options.readahead || 1, options.chunkSize ?? 1 << 20));
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    const end = offset + buf.length;
    if (this.options.readahead > 0) {
      // Large reads are already efficient requests: readahead would only add a copy.
      if (this.followsOn(offset, end) && buf.length < this.chunkSize / 2) this.readAhead(offset, end);
      if (this.coveredByChunks(offset, end)) return this.copyFromChunks(buf, offset);
    }
    return this.enqueue(buf, offset);
  }

  /**
   * Views of readahead chunks holding [offset, offset+length), when a sequential reader's
   * window covers it (starting or moving the window as `read` does, for reads of any size:
   * a lent view costs no copy); undefined otherwise (then `read` it: the same range asked
   * right after is not counted twice). Give the views back with `giveBack` once done.
   */
  lend(offset: number, length: number): Promise<Uint8Array[]> | undefined {
    const end = offset + length;
    if (this.options.readahead <= 0 || length === 0) return undefined;
    if (this.followsOn(offset, end)) this.readAhead(offset, end);
    if (!this.coveredByChunks(offset, end)) return undefined;
    const needed = this.pin(offset, end);
    return this.viewsOf(needed, offset, end).catch((e) => {
      for (const chunk of needed) this.unpin(chunk);
      throw e;
    });
  }

  /** Views from `lend` that are no longer used; views this reader did not lend are ignored. */
  giveBack(views: readonly Uint8Array[]): void {
    for (const view of views) {
      const chunk = this.lentFrom.get(view.buffer);
      if (chunk && chunk.pins > 0 && !chunk.recycled) this.unpin(chunk);
    }
  }

  /** Forgets readahead (the object changed, or the disk closes). */
  reset(): void {
    for (const chunk of this.chunks.values()) this.drop(chunk);
    this.chunks.clear();
    this.sequentialRun = 0;
    this.lastStart = -1;
    this.lastEnd = -1;
  }

  /** Records a read; true once it continues a run of sequential reads long enough to read ahead. */
  private followsOn(offset: number, end: number): boolean {
    if (offset === this.lastStart && end === this.lastEnd) return this.sequentialRun >= SEQUENTIAL_RUN;
    const sequential = this.lastEnd >= 0 && offset >= this.lastEnd - this.chunkSize && offset <= this.lastEnd + this.chunkSize;
    this.sequentialRun = sequential ? this.sequentialRun + 1 : 0;
    this.lastStart = offset;
    this.lastEnd = end;
    return this.sequentialRun >= SEQUENTIAL_RUN;
  }

  private readAhead(offset: number, end: number): void {
    this.dropChunksBefore(offset - this.chunkSize);
    this.ensureChunks(offset, Math.min(this.options.size, end + this.options.readahead));
  }

  private enqueue(target: Uint8Array, offset: number, alone = false): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      (alone ? this.aheadQueue : this.queue).push({ offset, target, alone, resolve, reject });
      this.schedulePump();
    });
  }

  /** Pumps on the next tick, so reads that arrive together can be merged. */
  private schedulePump(): void {
    if (this.pumpScheduled) return;
    this.pumpScheduled = true;
    process.nextTick(() => {
      this.pumpScheduled = false;
      this.pump();
    });
  }

  private pump(): void {
    while (this.inFlight < this.options.maxInFlight && (this.queue.length > 0 || this.aheadQueue.length > 0)) {
      const batch = this.queue.length > 0 ? this.takeBatch() : [this.aheadQueue.shift()!];
      this.inFlight++;
      void this.run(batch).finally(() => {
        this.inFlight--;
        this.pump();
      });
    }
  }

  /** The oldest asked-for read and every queued one that continues it end to end. */
  private takeBatch(): Job[] {
    const first = this.queue.shift()!;
    const batch = [first];
    let end = first.offset + first.target.length;
    for (let found = true; found; ) {
      found = false;
      for (let i = 0; i < this.queue.length; i++) {
        const job = this.queue[i];
        if (job.offset === end && end + job.target.length - first.offset <= this.options.maxRequest) {
          batch.push(job);
          end += job.target.length;
          this.queue.splice(i, 1);
          found = true;
          break;
        }
      }
    }
    return batch;
  }

  private async run(batch: Job[]): Promise<void> {
    try {
      // One request; its body goes straight into the callers' buffers, in order.
      await this.fetch(
        batch.map((job) => job.target),
        batch[0].offset,
      );
      for (const job of batch) job.resolve();
    } catch (e) {
      for (const job of batch) job.reject(e);
    }
  }

  private ensureChunks(from: number, to: number): void {
    const first = Math.floor(from / this.chunkSize);
    const last = Math.floor((to - 1) / this.chunkSize);
    for (let index = first; index <= last; index++) {
      if (this.chunks.has(index)) continue;
      const offset = index * this.chunkSize;
      const buf = this.bufferFor(Math.min(this.chunkSize, this.options.size - offset));
      const chunk: Chunk = { index, buf, ready: this.enqueue(buf, offset, true), settled: false, dropped: false, pins: 0, recycled: false };
      chunk.ready.then(
        () => this.settle(chunk),
        () => {
          // A failed chunk is forgotten; the read that needed it reports the error.
          if (this.chunks.get(index) === chunk) this.chunks.delete(index);
          this.drop(chunk);
          this.settle(chunk);
        },
      );
      this.chunks.set(index, chunk);
    }
  }

  private dropChunksBefore(offset: number): void {
    for (const [index, chunk] of this.chunks) {
      if ((index + 1) * this.chunkSize <= offset) {
        this.chunks.delete(index);
        this.drop(chunk);
      }
    }
    // Bounded memory even when a reader jumps around inside the window.
    const limit = Math.ceil(this.options.readahead / this.chunkSize) * 2 + 2;
    if (this.chunks.size > limit) {
      const sorted = [...this.chunks.keys()].sort((a, b) => a - b);
      for (const index of sorted.slice(0, this.chunks.size - limit)) {
        this.drop(this.chunks.get(index)!);
        this.chunks.delete(index);
      }
    }
  }

  private coveredByChunks(offset: number, end: number): boolean {
    for (let index = Math.floor(offset / this.chunkSize); index * this.chunkSize < end; index++) {
      if (!this.chunks.has(index)) return false;
    }
    return true;
  }

  private async copyFromChunks(buf: Uint8Array, offset: number): Promise<void> {
    const needed = this.pin(offset, offset + buf.length);
    try {
      let at = 0;
      for (const view of await this.viewsOf(needed, offset, offset + buf.length)) {
        buf.set(view, at);
        at += view.length;
      }
    } finally {
      for (const chunk of needed) this.unpin(chunk);
    }
  }

  /** The window's chunks holding [offset, end), pinned: none is reused until unpinned. */
  private pin(offset: number, end: number): Chunk[] {
    const needed: Chunk[] = [];
    for (let index = Math.floor(offset / this.chunkSize); index * this.chunkSize < end; index++) {
      const chunk = this.chunks.get(index)!;
      chunk.pins++;
      needed.push(chunk);
    }
    return needed;
  }

  /** The bytes of [offset, end) in `needed` (pinned chunks, in order), once fetched. */
  private async viewsOf(needed: Chunk[], offset: number, end: number): Promise<Uint8Array[]> {
    const views: Uint8Array[] = [];
    for (const chunk of needed) {
      await chunk.ready;
      const chunkStart = chunk.index * this.chunkSize;
      const from = Math.max(offset, chunkStart);
      const to = Math.min(end, chunkStart + chunk.buf.length);
      views.push(chunk.buf.subarray(from - chunkStart, to - chunkStart));
      this.lentFrom.set(chunk.buf.buffer, chunk);
    }
    return views;
  }

  // ---- chunk buffers: reused only once nothing can see or write them --------------------

  private bufferFor(size: number): Uint8Array {
    if (size === this.chunkSize && this.spare.length > 0) return this.spare.pop()!;
    // Its own memory (never a slice of a shared pool): views of it are recognised by it.
    return Buffer.allocUnsafeSlow(size);
  }

  private drop(chunk: Chunk): void {
    chunk.dropped = true;
    this.recycle(chunk);
  }

  private settle(chunk: Chunk): void {
    chunk.settled = true;
    this.recycle(chunk);
  }

  private unpin(chunk: Chunk): void {
    chunk.pins--;
    this.recycle(chunk);
  }

  private recycle(chunk: Chunk): void {
    if (chunk.recycled || !chunk.dropped || !chunk.settled || chunk.pins > 0) return;
    chunk.recycled = true;
    if (this.lentFrom.get(chunk.buf.buffer) === chunk) this.lentFrom.delete(chunk.buf.buffer);
    if (chunk.buf.length === this.chunkSize && this.spare.length < SPARE_CHUNKS) this.spare.push(chunk.buf);
  }
}
