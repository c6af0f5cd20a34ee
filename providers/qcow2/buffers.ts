/**
 * Buffers reused between requests for the stored bytes of compressed clusters, so that a
 * steady stream of decoded-cache misses allocates (and later collects) nothing.
 *
 * Each buffer is `size` bytes; at most `keep` spare ones are held. A request for more
 * than `size` bytes (only a hostile descriptor asks for that) gets a buffer of its own,
 * which is not kept.
 */
export class BufferPool {
  private readonly spares: Uint8Array[] = [];

  constructor(
    readonly size: number,
    readonly keep: number,
  ) {}

  /** A buffer of exactly `length` bytes, its contents undefined. */
  take(length: number): Uint8Array {
    if (length > this.size) return new Uint8Array(length);
    return (this.spares.pop() ?? new Uint8Array(this.size)).subarray(0, length);
  }

  /** Hands back a buffer from take(); it must not be used afterwards. */
  give(buffer: Uint8Array): void {
    if (buffer.buffer.byteLength === this.size && this.spares.length < this.keep) this.spares.push(new Uint8Array(buffer.buffer, 0, this.size));
  }

  /** Spare buffers held now. */
  get held(): number {
    return this.spares.length;
  }

  clear(): void {
    this.spares.length = 0;
  }
}
