/**
 * Large reply buffers, kept for reuse once the socket has written them.
 *
 * A fresh buffer of a megabyte is an mmap, page faults on first touch and an munmap when
 * the garbage collector frees it; a sequential 1 MiB read stream paid more for that than
 * for the protocol. Buffers of POOL_MIN bytes and more are therefore taken from here and
 * given back by the socket's write callback. Sizes are rounded up to 64 KiB so that a
 * client's fixed request size always finds its class; at most `limit` bytes wait here.
 */
const POOL_MIN = 128 * 1024;
const GRAIN = 64 * 1024;

export class BufferPool {
  private readonly spare = new Map<number, ArrayBuffer[]>();
  private spareBytes = 0;

  constructor(private readonly limit = 16 * 1024 * 1024) {}

  /** A buffer of exactly `size` bytes, uninitialized. */
  take(size: number): Buffer {
    if (size < POOL_MIN) return Buffer.allocUnsafe(size);
    const capacity = Math.ceil(size / GRAIN) * GRAIN;
    const memory = this.spare.get(capacity)?.pop();
    if (memory) {
      this.spareBytes -= capacity;
      return Buffer.from(memory, 0, size);
    }
    return Buffer.from(new ArrayBuffer(capacity), 0, size);
  }

  /** Gives back a buffer from `take` that nothing will touch any more. */
  give(buf: Buffer): void {
    const memory = buf.buffer;
    if (buf.length < POOL_MIN || buf.byteOffset !== 0 || !(memory instanceof ArrayBuffer)) return;
    const capacity = memory.byteLength;
    if (capacity % GRAIN !== 0 || this.spareBytes + capacity > this.limit) return;
    let list = this.spare.get(capacity);
    if (!list) this.spare.set(capacity, (list = []));
    list.push(memory);
    this.spareBytes += capacity;
  }
}
