/**
 * Bytes received from a socket and not parsed yet, kept as the chunks they arrived in.
 *
 * Parsing reads fixed-size headers straight out of the first chunk when it holds them
 * whole (the common case), so a batch of pipelined requests costs no copying; only a
 * message split across chunks is gathered into a new buffer.
 *
 * A chunk may be *borrowed*: a view of a receive buffer the socket will fill again after
 * this turn. `take` then returns a copy (the caller may keep it), and `settle` copies
 * whatever borrowed bytes are still unparsed before the buffer is reused.
 */
/** Copies up to this size share slabs of SLAB_SIZE bytes. */
const SLAB_PIECE_MAX = 16 * 1024;
const SLAB_SIZE = 256 * 1024;

export class ByteQueue {
  private chunks: Buffer[] = [];
  /** Bytes of chunks[0] already consumed. */
  private headOffset = 0;
  private total = 0;
  /** The chunk in the queue that is borrowed (only ever the last one pushed), if any. */
  private borrowed: Buffer | undefined;
  /** Where small copies are carved from, and how much of it is used. */
  private slab: Buffer | undefined;
  private slabUsed = 0;

  get length(): number {
    return this.total;
  }

  /** Appends a chunk; a borrowed one must be `settle`d before its memory is reused. */
  push(chunk: Buffer, borrowed = false): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
    if (borrowed) this.borrowed = chunk;
  }

  /** Copies the unparsed part of a borrowed chunk into memory of its own. */
  settle(): void {
    const borrowed = this.borrowed;
    if (!borrowed) return;
    this.borrowed = undefined;
    const index = this.chunks.lastIndexOf(borrowed);
    if (index < 0) return; // fully consumed: nothing to keep
    const from = index === 0 ? this.headOffset : 0;
    this.chunks[index] = Buffer.from(borrowed.subarray(from));
    if (index === 0) this.headOffset = 0;
  }

  /**
   * A buffer and an offset where the next `n` bytes sit contiguously, consuming them.
   * The caller must read them before the next push (the buffer may be a received chunk).
   * Requires `length >= n`.
   */
  takeView(n: number): { buf: Buffer; at: number } {
    const head = this.chunks[0];
    if (head.length - this.headOffset >= n) {
      const at = this.headOffset;
      this.consume(n);
      return { buf: head, at };
    }
    return { buf: this.take(n), at: 0 };
  }

  /**
   * The next `n` bytes as one buffer the caller may keep: a view when they lie in one
   * chunk of our own, a copy otherwise. Requires `length >= n`.
   */
  take(n: number): Buffer {
    const head = this.chunks[0];
    if (n === 0) return Buffer.alloc(0);
    if (head.length - this.headOffset >= n && head !== this.borrowed) {
      const out = head.subarray(this.headOffset, this.headOffset + n);
      this.consume(n);
      return out;
    }
    const out = this.allocate(n);
    this.copyInto(out, 0, n);
    return out;
  }

  /**
   * Memory for a copy handed out by `take`. Small ones are carved from a shared slab: a
   * separate allocation per 4 KiB write payload is external memory V8 must collect (the
   * slab is freed once no copy from it is alive).
   */
  private allocate(n: number): Buffer {
    if (n > SLAB_PIECE_MAX) return Buffer.allocUnsafe(n);
    if (!this.slab || this.slabUsed + n > this.slab.length) {
      this.slab = Buffer.allocUnsafeSlow(SLAB_SIZE);
      this.slabUsed = 0;
    }
    const out = this.slab.subarray(this.slabUsed, this.slabUsed + n);
    // Keep pieces 8-byte aligned, as Node's own pool does.
    this.slabUsed += (n + 7) & ~7;
    return out;
  }

  /** Moves the next `n` bytes into `target` at `at`. Requires `length >= n`. */
  copyInto(target: Uint8Array, at: number, n: number): void {
    let filled = 0;
    while (filled < n) {
      const head = this.chunks[0];
      const available = head.length - this.headOffset;
      const step = Math.min(available, n - filled);
      target.set(head.subarray(this.headOffset, this.headOffset + step), at + filled);
      filled += step;
      this.consume(step);
    }
  }

  /** Drops up to `n` bytes; returns how many were dropped. */
  skip(n: number): number {
    const dropped = Math.min(n, this.total);
    let left = dropped;
    while (left > 0) {
      const available = this.chunks[0].length - this.headOffset;
      const step = Math.min(available, left);
      this.consume(step);
      left -= step;
    }
    return dropped;
  }

  clear(): void {
    this.chunks = [];
    this.headOffset = 0;
    this.total = 0;
    this.borrowed = undefined;
  }

  private consume(n: number): void {
    this.total -= n;
    this.headOffset += n;
    if (this.headOffset === this.chunks[0].length) {
      if (this.chunks[0] === this.borrowed) this.borrowed = undefined;
      this.chunks.shift();
      this.headOffset = 0;
    }
  }
}
