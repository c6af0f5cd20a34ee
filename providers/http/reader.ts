/**
 * Turns the reads a disk receives into range requests:
 *  - at most `maxInFlight` requests at once; reads waiting for a slot that touch end to
 *    end are merged into one request (up to `maxRequest` bytes);
 *  - a run of small sequential reads starts readahead: the next `readahead` bytes are
 *    fetched in chunks before they are asked for, and reads inside fetched chunks are
 *    copied from them (reads of half a chunk or more go straight to the server).
 * A merged request fills its readers' buffers straight, one after the other (no scratch
 * buffer, no copy). Reads the disk was asked for go before readahead chunks waiting for a
 * slot: a guest never waits behind a guess. It knows nothing of HTTP: `fetch(targets,
 * offset)` fills buffers.
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
}

/** Sequential reads in a row before readahead starts. */
const SEQUENTIAL_RUN = 2;

export class RangeReader {
  /** Reads asked for, waiting for a slot (served first). */
  private queue: Job[] = [];
  /** Readahead chunks waiting for a slot. */
  private aheadQueue: Job[] = [];
  private inFlight = 0;
  private pumpScheduled = false;
  private readonly chunkSize: number;
  private readonly chunks = new Map<number, Chunk>();
  private lastEnd = -1;
  private sequentialRun = 0;

  constructor(
    private readonly fetch: FetchRange,
    private readonly options: ReaderOptions,
  ) {
    this.chunkSize = Math.max(4096, Math.min(options.readahead || 1, 1 << 20));
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    const end = offset + buf.length;
    if (this.options.readahead > 0) {
      const sequential = this.lastEnd >= 0 && offset >= this.lastEnd - this.chunkSize && offset <= this.lastEnd + this.chunkSize;
      this.sequentialRun = sequential ? this.sequentialRun + 1 : 0;
      this.lastEnd = end;
      // Large reads are already efficient requests: readahead would only add a copy.
      if (this.sequentialRun >= SEQUENTIAL_RUN && buf.length < this.chunkSize / 2) {
        this.dropChunksBefore(offset - this.chunkSize);
        this.ensureChunks(offset, Math.min(this.options.size, end + this.options.readahead));
      }
      if (this.coveredByChunks(offset, end)) return this.copyFromChunks(buf, offset);
    }
    return this.enqueue(buf, offset);
  }

  /** Forgets readahead (the object changed, or the disk closes). */
  reset(): void {
    this.chunks.clear();
    this.sequentialRun = 0;
    this.lastEnd = -1;
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
      const buf = Buffer.allocUnsafe(Math.min(this.chunkSize, this.options.size - offset));
      const chunk: Chunk = { index, buf, ready: this.enqueue(buf, offset, true) };
      // A failed chunk is forgotten; the read that needed it reports the error.
      chunk.ready.catch(() => {
        if (this.chunks.get(index) === chunk) this.chunks.delete(index);
      });
      this.chunks.set(index, chunk);
    }
  }

  private dropChunksBefore(offset: number): void {
    for (const index of this.chunks.keys()) {
      if ((index + 1) * this.chunkSize <= offset) this.chunks.delete(index);
    }
    // Bounded memory even when a reader jumps around inside the window.
    const limit = Math.ceil(this.options.readahead / this.chunkSize) * 2 + 2;
    if (this.chunks.size > limit) {
      const sorted = [...this.chunks.keys()].sort((a, b) => a - b);
      for (const index of sorted.slice(0, this.chunks.size - limit)) this.chunks.delete(index);
    }
  }

  private coveredByChunks(offset: number, end: number): boolean {
    for (let index = Math.floor(offset / this.chunkSize); index * this.chunkSize < end; index++) {
      if (!this.chunks.has(index)) return false;
    }
    return true;
  }

  private async copyFromChunks(buf: Uint8Array, offset: number): Promise<void> {
    const end = offset + buf.length;
    const needed: Chunk[] = [];
    for (let index = Math.floor(offset / this.chunkSize); index * this.chunkSize < end; index++) needed.push(this.chunks.get(index)!);
    for (const chunk of needed) {
      await chunk.ready;
      const chunkStart = chunk.index * this.chunkSize;
      const from = Math.max(offset, chunkStart);
      const to = Math.min(end, chunkStart + chunk.buf.length);
      buf.set(chunk.buf.subarray(from - chunkStart, to - chunkStart), from - offset);
    }
  }
}
