/**
 * Bytes received from a socket and not parsed yet, kept as the chunks they arrived in.
 *
 * Parsing reads fixed-size headers straight out of the first chunk when it holds them
 * whole (the common case), so a batch of pipelined requests costs no copying; only a
 * message split across chunks is gathered into a new buffer.
 */
export class ByteQueue {
  private chunks: Buffer[] = [];
  /** Bytes of chunks[0] already consumed. */
  private headOffset = 0;
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
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

  /** The next `n` bytes as one buffer (a view when they lie in one chunk). Requires `length >= n`. */
  take(n: number): Buffer {
    const head = this.chunks[0];
    if (n === 0) return Buffer.alloc(0);
    if (head.length - this.headOffset >= n) {
      const out = head.subarray(this.headOffset, this.headOffset + n);
      this.consume(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    this.copyInto(out, 0, n);
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
  }

  private consume(n: number): void {
    this.total -= n;
    this.headOffset += n;
    if (this.headOffset === this.chunks[0].length) {
      this.chunks.shift();
      this.headOffset = 0;
    }
  }
}
