/**
 * memory: a sparse RAM disk. `memory:1T` opens at once; only written chunks cost memory.
 * Trim and zero give whole chunks back; extents report unwritten chunks as holes.
 * Option `limit=SIZE` caps the RAM used: a write that would pass it fails with ENOSPC.
 */
import { BlockError, SpecError } from '../../core/errors';
import { OpenRequest } from '../../core/open-request';
import type { Capabilities, DiskInfo, Extent, Provider, WriteOptions, ZeroOptions } from '../../core/provider';
import { provider } from '../../core/registry';
import { forEachPiece } from '../../core/pieces';
import { parseSize } from '../../core/size';

/** Allocation unit. 64 KiB keeps the chunk map small for large disks and copies cheap. */
const CHUNK = 64 * 1024;
/** What a hole reads as, lent by readViews; nothing ever writes to it. */
const ZEROS = Buffer.alloc(CHUNK);

@provider({
  name: 'memory',
  kind: 'source',
  description: 'sparse RAM disk (memory:SIZE, option limit=SIZE)',
  options: ['limit'],
})
export class MemoryProvider implements Provider {
  readonly name = 'memory';
  private readonly size: number;
  private readonly limit: number;
  private readonly readOnly: boolean;
  private readonly chunks = new Map<number, Buffer>();

  constructor(request: OpenRequest) {
    if (request.arg === '') throw new SpecError('EINVAL', `memory needs a size (memory:1G) in spec '${request.spec}'`, true);
    this.size = parseSize(request.arg, 'memory size', request.spec);
    this.readOnly = request.readOnly;
    this.limit = request.options.limit !== undefined ? parseSize(request.options.limit, 'memory limit', request.spec) : Infinity;
  }

  info(): DiskInfo {
    return { size: this.size, logicalBlockSize: 1, physicalBlockSize: 4096, readOnly: this.readOnly };
  }

  capabilities(): Capabilities {
    const write = !this.readOnly;
    return { write, flush: true, fua: write, trim: write, zero: write, extents: true, multiConn: true, concurrent: true };
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    forEachPiece(offset, buf.length, CHUNK, (index, within, length, done) => {
      const chunk = this.chunks.get(index);
      // A plain Uint8Array view: a Buffer's subarray costs as much as a 4 KiB copy.
      if (chunk) buf.set(new Uint8Array(chunk.buffer, chunk.byteOffset + within, length), done);
      else buf.fill(0, done, done + length);
    });
  }

  /**
   * The bytes as views of the chunks themselves (holes: one shared buffer of zeros), so an
   * NBD reply goes from here to the socket without a copy. A write lands in a chunk in
   * place, so a view still being sent shows it: the contract's caveat.
   */
  readViews(offset: number, length: number): Uint8Array[] {
    const views: Uint8Array[] = [];
    forEachPiece(offset, length, CHUNK, (index, within, n) => {
      const chunk = this.chunks.get(index);
      views.push(chunk ? chunk.subarray(within, within + n) : ZEROS.subarray(0, n));
    });
    return views;
  }

  async write(buf: Uint8Array, offset: number, _options: WriteOptions): Promise<void> {
    // Check the limit before touching anything, so a refused write changes nothing.
    let fresh = 0;
    forEachPiece(offset, buf.length, CHUNK, (index) => {
      if (!this.chunks.has(index)) fresh++;
    });
    if (fresh > 0 && (this.chunks.size + fresh) * CHUNK > this.limit) {
      throw new BlockError('ENOSPC', `memory disk is over its limit of ${this.limit} bytes`);
    }
    forEachPiece(offset, buf.length, CHUNK, (index, within, length, done) => {
      let chunk = this.chunks.get(index);
      if (!chunk) {
        chunk = Buffer.alloc(Math.min(CHUNK, this.size - index * CHUNK));
        this.chunks.set(index, chunk);
      }
      chunk.set(buf.subarray(done, done + length), within);
    });
  }

  async flush(): Promise<void> {}

  async trim(offset: number, length: number): Promise<void> {
    this.release(offset, length);
  }

  async zero(offset: number, length: number, _options: ZeroOptions): Promise<void> {
    // Zeroed memory is indistinguishable from a hole, so zero always releases.
    this.release(offset, length);
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    const runs: Extent[] = [];
    const push = (start: number, end: number, type: Extent['type']) => {
      const last = runs[runs.length - 1];
      if (last && last.type === type && last.offset + last.length === start) last.length += end - start;
      else runs.push({ offset: start, length: end - start, type });
    };
    const end = offset + length;
    let cursor = offset;
    for (const index of this.allocatedIndexesIn(offset, end)) {
      const chunkStart = index * CHUNK;
      if (chunkStart > cursor) push(cursor, chunkStart, 'hole');
      const stop = Math.min(end, chunkStart + CHUNK);
      push(Math.max(cursor, chunkStart), stop, 'data');
      cursor = stop;
    }
    if (cursor < end) push(cursor, end, 'hole');
    return runs;
  }

  async allocatedBytes(): Promise<number> {
    let total = 0;
    for (const chunk of this.chunks.values()) total += chunk.length;
    return total;
  }

  async close(): Promise<void> {
    this.chunks.clear();
  }

  /** Frees whole chunks inside the range and clears the partial ones at its edges. */
  private release(offset: number, length: number): void {
    forEachPiece(offset, length, CHUNK, (index, within, pieceLength) => {
      const chunk = this.chunks.get(index);
      if (!chunk) return;
      if (within === 0 && pieceLength === chunk.length) this.chunks.delete(index);
      else chunk.fill(0, within, within + pieceLength);
    });
  }

  /** Sorted indexes of allocated chunks overlapping [start, end), without walking a huge empty range. */
  private allocatedIndexesIn(start: number, end: number): number[] {
    const first = Math.floor(start / CHUNK);
    const last = Math.floor((end - 1) / CHUNK);
    if (last - first + 1 <= this.chunks.size) {
      const out: number[] = [];
      for (let i = first; i <= last; i++) if (this.chunks.has(i)) out.push(i);
      return out;
    }
    return [...this.chunks.keys()].filter((i) => i >= first && i <= last).sort((a, b) => a - b);
  }
}
