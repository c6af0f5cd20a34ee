/**
 * Guest offset → where its bytes are: the L1/L2 lookup, with L2 tables in a bounded LRU.
 *
 * `run(guest, max)` answers with the longest stretch starting at `guest` (inside one L2
 * table) that reads the same way: host-contiguous data, zeros, unallocated (the backing
 * file's or zeros), or one compressed cluster. With extended L2 entries the unit is the
 * subcluster (1/32 of a cluster); otherwise the cluster.
 *
 * Entries are parsed as two 32-bit halves: flags live in bits 62 and 63, beyond what a
 * Number holds exactly. Damage found here is a CorruptImageError with code EIO: the image
 * opened, but this part of it cannot be read.
 */
import { CorruptImageError } from '../../core/errors';
import { PromiseLru } from './lru';

export type RunKind = 'data' | 'zero' | 'unallocated' | 'compressed';

export interface Run {
  kind: RunKind;
  guest: number;
  length: number;
  /** data: host offset of `guest` (in the data file when there is one). */
  host?: number;
  /** compressed: the descriptor's byte extent in the image file, and the cluster's guest start. */
  compressed?: { offset: number; length: number; clusterGuest: number };
}

export interface MapGeometry {
  clusterBits: number;
  extendedL2: boolean;
  /** An external data file holds the data clusters (host offset 0 is then legal). */
  externalData: boolean;
  /** The image file's size: L2 tables and compressed data must lie inside it. */
  imageSize: number;
  /** Where messages say the damage is. */
  location: string;
}

export type ReadAt = (offset: number, length: number) => Promise<Uint8Array>;

const SUBCLUSTERS = 32;

export class ClusterMap {
  readonly clusterSize: number;
  /** Entries per L2 table. */
  readonly l2Entries: number;
  private readonly entryBytes: number;
  private readonly unitSize: number;
  private readonly l2Cache: PromiseLru<DataView>;
  private readonly l1View: DataView;

  constructor(
    private readonly geometry: MapGeometry,
    /** The L1 table as stored (8-byte big-endian entries). */
    private readonly l1: Uint8Array,
    private readonly readImage: ReadAt,
    l2CacheTables: number,
  ) {
    this.clusterSize = 2 ** geometry.clusterBits;
    this.entryBytes = geometry.extendedL2 ? 16 : 8;
    this.l2Entries = this.clusterSize / this.entryBytes;
    this.unitSize = geometry.extendedL2 ? this.clusterSize / SUBCLUSTERS : this.clusterSize;
    this.l2Cache = new PromiseLru(Math.max(1, l2CacheTables));
    this.l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  }

  /** L2 tables held in the cache now, and how many it may hold. */
  l2CacheUse(): { tables: number; capacity: number } {
    return { tables: this.l2Cache.size, capacity: this.l2Cache.capacity };
  }

  clearCaches(): void {
    this.l2Cache.clear();
  }

  /** Bytes of guest disk one L2 table maps. */
  get l2Span(): number {
    return this.l2Entries * this.clusterSize;
  }

  private corrupt(field: string, message: string): CorruptImageError {
    return new CorruptImageError(field, `qcow2: ${this.geometry.location}: ${message}`, 'EIO');
  }

  /** The longest uniform stretch from `guest`, at most `max` bytes. */
  async run(guest: number, max: number): Promise<Run> {
    const loaded = this.runLoaded(guest, max);
    if (loaded) return loaded;
    const l1Index = Math.floor(guest / this.l2Span);
    const l2Offset = this.l2TableOffset(l1Index);
    return this.runIn(await this.loadL2(l2Offset, l1Index), l2Offset, guest, max);
  }

  /**
   * run() without waiting, when no table has to be read for it (its L2 table is cached,
   * or there is none); undefined otherwise. Most small reads are answered here.
   */
  runLoaded(guest: number, max: number): Run | undefined {
    const l1Index = Math.floor(guest / this.l2Span);
    const l2Offset = this.l2TableOffset(l1Index);
    if (l2Offset === 0) return { kind: 'unallocated', guest, length: Math.min(guest + max, (l1Index + 1) * this.l2Span) - guest };
    const l2 = this.l2Cache.peek(l2Offset);
    return l2 && this.runIn(l2, l2Offset, guest, max);
  }

  /** run() once the L2 table at `l2Offset`, which maps `guest`, is at hand. */
  private runIn(l2: DataView, l2Offset: number, guest: number, max: number): Run {
    const clusterIndex = Math.floor(guest / this.clusterSize);
    const tableEnd = (Math.floor(clusterIndex / this.l2Entries) + 1) * this.l2Span;
    const limit = Math.min(guest + max, tableEnd);
    const first = this.classify(l2, guest, l2Offset);
    if (first.kind === 'compressed') {
      const clusterEnd = (clusterIndex + 1) * this.clusterSize;
      return { kind: 'compressed', guest, length: Math.min(limit, clusterEnd) - guest, compressed: first.compressed };
    }
    // Extend unit by unit while the kind (and host contiguity) holds.
    let end = Math.min(limit, (Math.floor(guest / this.unitSize) + 1) * this.unitSize);
    while (end < limit) {
      const next = this.classify(l2, end, l2Offset);
      if (next.kind !== first.kind) break;
      if (first.kind === 'data' && next.host !== first.host! + (end - guest)) break;
      end = Math.min(limit, end + this.unitSize);
    }
    return { kind: first.kind, guest, length: end - guest, host: first.host };
  }

  private l2TableOffset(l1Index: number): number {
    if ((l1Index + 1) * 8 > this.l1.length) return 0; // beyond the L1 table: nothing allocated
    const hi = this.l1View.getUint32(l1Index * 8);
    const lo = this.l1View.getUint32(l1Index * 8 + 4);
    const offset = (hi & 0x00ffffff) * 2 ** 32 + (lo & 0xfffffe00);
    if (offset === 0) return 0;
    if (offset % this.clusterSize !== 0) throw this.corrupt('l1_entry', `L1 entry ${l1Index} points to ${offset}, not aligned to the ${this.clusterSize}-byte cluster`);
    if (offset + this.clusterSize > this.geometry.imageSize) {
      throw this.corrupt('l1_entry', `L1 entry ${l1Index} points to an L2 table at ${offset}, past the end of the ${this.geometry.imageSize}-byte file`);
    }
    return offset;
  }

  private loadL2(offset: number, l1Index: number): Promise<DataView> {
    return this.l2Cache.get(offset, async () => {
      const table = await this.readImage(offset, this.clusterSize);
      if (table.length !== this.clusterSize) throw this.corrupt('l1_entry', `L2 table ${l1Index} at ${offset} is cut short by the end of the file`);
      return new DataView(table.buffer, table.byteOffset, table.byteLength);
    });
  }

  /** The L2 entry of a cluster, for messages (built only then: classify runs for every read). */
  private entryName(l2Offset: number, clusterIndex: number): string {
    return `L2 entry ${clusterIndex % this.l2Entries} of the table at ${l2Offset} (guest offset ${clusterIndex * this.clusterSize})`;
  }

  /** How the unit at `guest` reads, from its L2 entry. */
  private classify(l2: DataView, guest: number, l2Offset: number): Omit<Run, 'guest' | 'length'> {
    const clusterIndex = Math.floor(guest / this.clusterSize);
    const index = clusterIndex % this.l2Entries;
    const at = index * this.entryBytes;
    const hi = l2.getUint32(at);
    const lo = l2.getUint32(at + 4);
    if (hi & 0x40000000) return { kind: 'compressed', compressed: this.compressedExtent(hi, lo, l2Offset, clusterIndex) };

    const host = (hi & 0x00ffffff) * 2 ** 32 + (lo & 0xfffffe00);
    if (host % this.clusterSize !== 0) throw this.corrupt('l2_entry', `${this.entryName(l2Offset, clusterIndex)} points to ${host}, not aligned to the ${this.clusterSize}-byte cluster`);

    if (this.geometry.extendedL2) {
      const zeroBits = l2.getUint32(at + 8);
      const allocBits = l2.getUint32(at + 12);
      if ((zeroBits & allocBits) !== 0) throw this.corrupt('l2_bitmap', `${this.entryName(l2Offset, clusterIndex)} marks subclusters both allocated and zero (bitmap 0x${zeroBits.toString(16)}${allocBits.toString(16).padStart(8, '0')})`);
      if (allocBits !== 0 && host === 0 && !this.geometry.externalData) throw this.corrupt('l2_entry', `${this.entryName(l2Offset, clusterIndex)} has allocated subclusters but no host cluster`);
      const sub = Math.floor((guest % this.clusterSize) / this.unitSize);
      const bit = 1 << sub;
      if (allocBits & bit) return { kind: 'data', host: host + sub * this.unitSize + (guest % this.unitSize) };
      if (zeroBits & bit) return { kind: 'zero' };
      return { kind: 'unallocated' };
    }

    // The zero flag is a v3 feature, but qemu honours it in any version: so do we.
    if (lo & 1) return { kind: 'zero' };
    if (host === 0 && !(this.geometry.externalData && hi & 0x80000000)) return { kind: 'unallocated' };
    return { kind: 'data', host: host + (guest % this.clusterSize) };
  }

  /**
   * A compressed descriptor: with x = 62 - (cluster_bits - 8), bits 0..x-1 are the byte
   * offset, bits x..61 the number of 512-byte sectors beyond the first.
   */
  private compressedExtent(hi: number, lo: number, l2Offset: number, clusterIndex: number): Run['compressed'] {
    if (this.geometry.externalData) throw this.corrupt('l2_entry', `${this.entryName(l2Offset, clusterIndex)} is compressed, which an image with an external data file cannot be`);
    // x is 49 (2 MiB clusters) to 61 (512 B), so the offset takes all of `lo` and the low
    // x - 32 bits of `hi`'s 30 descriptor bits; the sector count is the rest of them.
    const highBits = 62 - (this.geometry.clusterBits - 8) - 32;
    const descriptorHi = hi & 0x3fffffff;
    const offsetHi = descriptorHi & (2 ** highBits - 1);
    if (offsetHi >= 2 ** 24) throw this.corrupt('l2_entry', `${this.entryName(l2Offset, clusterIndex)}: compressed data offset ${BigInt(offsetHi) * 2n ** 32n + BigInt(lo >>> 0)} is beyond 2^56`);
    const offset = offsetHi * 2 ** 32 + (lo >>> 0);
    const sectors = Math.floor(descriptorHi / 2 ** highBits) + 1;
    const length = sectors * 512 - (offset % 512);
    const size = this.geometry.imageSize;
    // The extent is rounded to whole sectors; only its last partial sector may pass EOF.
    if (offset >= size || offset + length > Math.ceil(size / 512) * 512) {
      throw this.corrupt('l2_entry', `${this.entryName(l2Offset, clusterIndex)}: compressed data at ${offset} (${length} bytes) lies past the end of the ${size}-byte file`);
    }
    return { offset, length: Math.min(length, size - offset), clusterGuest: clusterIndex * this.clusterSize };
  }
}
