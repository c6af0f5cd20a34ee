/**
 * cache: an LRU block cache over any provider (`cache,size=256M,block=64K:SPEC`), in
 * memory or in a local file (`file=/path`) whose index is saved on close so a restarted
 * server starts warm. Reads fill whole blocks; concurrent misses for a block share one
 * lower read; writes go through to the lower provider and drop the blocks they touch.
 * A lower provider that reports its bytes changed (SourceChangedError) empties the
 * cache; a saved index for another version of the lower bytes is discarded.
 */
import * as fs from 'node:fs';
import * as zlib from 'node:zlib';
import { BlockError, SpecError } from '../../core/errors';
import { isSourceChanged } from '../../core/changed';
import { OpenRequest } from '../../core/open-request';
import type { Capabilities, DiskInfo, Extent, Provider, WriteOptions, ZeroOptions } from '../../core/provider';
import { provider } from '../../core/registry';
import { formatSize, parseSize } from '../../core/size';
import { chainIdentity } from './identity';
import { FileStore, MemoryStore, type BlockStore } from './store';

/** One cached block: which slot holds it. A new object per insert, so a reader can tell it was replaced. */
interface Entry {
  slot: number;
  /** CRC-32 of the block's bytes, saved with the index. */
  crc: number;
  /** False for entries loaded from a saved index until their bytes were checked against `crc`. */
  verified: boolean;
}

interface SavedIndex {
  version: 2;
  identity: string;
  blockSize: number;
  capacity: number;
  /** [block index, slot, CRC-32 of the block], least recently used first. */
  entries: Array<[number, number, number]>;
}

const INDEX_VERSION = 2;

@provider({
  name: 'cache',
  kind: 'filter',
  description: 'LRU block cache in memory or a local file (cache,size=256M,block=64K[,file=PATH]:SPEC)',
  options: ['size', 'block', 'file'],
})
export class CacheFilter implements Provider {
  readonly name = 'cache';
  readonly lower: Provider;
  private readonly blockSize: number;
  private readonly capacity: number;
  private readonly filePath?: string;
  private store!: BlockStore;
  private diskSize: number;
  /** Block index → entry, in LRU order (a Map iterates in insertion order; a hit re-inserts). */
  private readonly entries = new Map<number, Entry>();
  private readonly freeSlots: number[] = [];
  private readonly busySlots = new Set<number>();
  /** Blocks being written to the store after their fill; close waits for them. */
  private readonly storing = new Set<Promise<void>>();
  /** Lower reads in progress, by block: a second miss for the block waits for the first. */
  private readonly pending = new Map<number, Promise<Uint8Array>>();
  /** Bumped when the cache is emptied: fills started before do not insert. */
  private generation = 0;
  /** Bumped at every write's start and end: a fill that overlapped a write does not insert. */
  private writeSeq = 0;
  private activeWrites = 0;
  private persist = false;
  private stats = { hits: 0, misses: 0 };

  constructor(private readonly request: OpenRequest) {
    if (!request.lower) throw new BlockError('EINVAL', `cache needs a disk to sit on (cache:SPEC)`);
    this.lower = request.lower;
    const o = request.options;
    this.blockSize = o.block !== undefined ? parseSize(o.block, 'cache block size') : 64 * 1024;
    if (this.blockSize < 512 || this.blockSize > 16 << 20 || (this.blockSize & (this.blockSize - 1)) !== 0) {
      throw new SpecError('EINVAL', `cache: block must be a power of two from 512 to 16M (got '${o.block}')`, true);
    }
    const size = o.size !== undefined ? parseSize(o.size, 'cache size') : 64 << 20;
    this.capacity = Math.floor(size / this.blockSize);
    if (this.capacity < 1) throw new SpecError('EINVAL', `cache: size ${formatSize(size)} holds no block of ${formatSize(this.blockSize)}`, true);
    this.filePath = o.file;
    this.diskSize = this.lower.info().size;
  }

  get location(): string | undefined {
    return this.lower.location;
  }

  async open(): Promise<void> {
    if (!this.filePath) {
      this.store = new MemoryStore(this.capacity);
    } else {
      this.store = await FileStore.open(this.filePath, this.capacity, this.blockSize);
      this.persist = true;
      await this.loadIndex();
    }
    const used = new Set([...this.entries.values()].map((e) => e.slot));
    for (let slot = this.capacity - 1; slot >= 0; slot--) if (!used.has(slot)) this.freeSlots.push(slot);
  }

  private get indexPath(): string {
    return `${this.filePath}.index`;
  }

  /** Loads a saved index if it is for this very chain, then removes it: it is rewritten on a clean close only. */
  private async loadIndex(): Promise<void> {
    const identity = chainIdentity(this.lower);
    if (!identity) {
      this.persist = false;
      this.request.warn(`cache: ${this.describeLower()} has no validator (ETag, file mtime); the cache file starts empty and is not kept`);
    }
    let text: string;
    try {
      text = await fs.promises.readFile(this.indexPath, 'utf8');
    } catch {
      return;
    }
    await fs.promises.unlink(this.indexPath).catch(() => {});
    let saved: SavedIndex;
    try {
      saved = JSON.parse(text) as SavedIndex;
    } catch {
      this.request.warn(`cache: ignoring the unreadable index ${this.indexPath}`);
      return;
    }
    if (!identity || saved.version !== INDEX_VERSION || saved.identity !== identity || saved.blockSize !== this.blockSize || saved.capacity !== this.capacity) {
      if (identity && saved.identity !== identity) this.request.warn(`cache: ${this.indexPath} was saved for another version of ${this.describeLower()}; starting empty`);
      return;
    }
    const maxBlock = Math.ceil(this.diskSize / this.blockSize);
    const slots = new Set<number>();
    for (const triple of Array.isArray(saved.entries) ? saved.entries : []) {
      const [block, slot, crc] = (Array.isArray(triple) ? triple : []) as number[];
      if (!Number.isInteger(block) || !Number.isInteger(slot) || !Number.isInteger(crc)) continue;
      if (block < 0 || block >= maxBlock || slot < 0 || slot >= this.capacity || slots.has(slot) || this.entries.has(block)) continue;
      slots.add(slot);
      // Checked against its CRC on first use: a damaged cache file costs a lower read, never wrong bytes.
      this.entries.set(block, { slot, crc, verified: false });
    }
  }

  private async saveIndex(): Promise<void> {
    const identity = chainIdentity(this.lower);
    if (!identity) return;
    await this.store.sync();
    const saved: SavedIndex = {
      version: INDEX_VERSION,
      identity,
      blockSize: this.blockSize,
      capacity: this.capacity,
      entries: [...this.entries].map(([block, e]) => [block, e.slot, e.crc]),
    };
    const tmp = `${this.indexPath}.tmp`;
    await fs.promises.writeFile(tmp, JSON.stringify(saved), { mode: 0o600 });
    await fs.promises.rename(tmp, this.indexPath);
  }

  private describeLower(): string {
    return this.lower.location ?? this.lower.name;
  }

  info(): DiskInfo {
    return this.lower.info();
  }

  capabilities(): Capabilities {
    return this.lower.capabilities();
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    const end = offset + buf.length;
    const first = Math.floor(offset / this.blockSize);
    const last = Math.floor((end - 1) / this.blockSize);
    const work: Promise<void>[] = [];
    let missStart = -1;
    for (let block = first; block <= last + 1; block++) {
      const isMiss = block <= last && !this.entries.has(block) && !this.pending.has(block);
      if (isMiss) {
        if (missStart < 0) missStart = block;
        continue;
      }
      if (missStart >= 0) {
        this.fill(missStart, block - 1);
        missStart = -1;
      }
      if (block > last) break;
    }
    for (let block = first; block <= last; block++) {
      const blockStart = block * this.blockSize;
      const from = Math.max(offset, blockStart);
      const to = Math.min(end, blockStart + this.blockSize);
      const target = buf.subarray(from - offset, to - offset);
      work.push(this.copyBlock(block, target, from - blockStart));
    }
    await Promise.all(work);
  }

  /** Copies part of one block: from the store if cached, else from the read filling it. */
  private async copyBlock(block: number, target: Uint8Array, within: number): Promise<void> {
    const filling = this.pending.get(block);
    if (filling) {
      const data = await filling;
      target.set(data.subarray(within, within + target.length));
      return;
    }
    const entry = this.entries.get(block);
    if (entry) {
      this.stats.hits++;
      this.entries.delete(block);
      this.entries.set(block, entry);
      if (entry.verified) {
        await this.store.read(entry.slot, target, within);
        // The slot was given to another block while we read it: read this piece below.
        if (this.entries.get(block) === entry) return;
      } else if (await this.verify(block, entry, target, within)) {
        return;
      }
    }
    await this.lowerRead(target, block * this.blockSize + within);
  }

  /** First use of a block from a saved index: read it whole and check its CRC; a bad block is dropped. */
  private async verify(block: number, entry: Entry, target: Uint8Array, within: number): Promise<boolean> {
    const whole = Buffer.allocUnsafe(this.blockLength(block));
    await this.store.read(entry.slot, whole, 0);
    if (this.entries.get(block) !== entry) return false;
    if (zlib.crc32(whole) !== entry.crc) {
      this.entries.delete(block);
      this.freeSlots.push(entry.slot);
      this.request.warn(`cache: block ${block} in ${this.filePath} does not match its checksum; reading it again`);
      return false;
    }
    entry.verified = true;
    target.set(whole.subarray(within, within + target.length));
    return true;
  }

  private blockLength(block: number): number {
    return Math.min(this.blockSize, this.diskSize - block * this.blockSize);
  }

  /** One lower read for blocks first..last; each block's promise resolves to its bytes. */
  private fill(first: number, last: number): void {
    const start = first * this.blockSize;
    const end = Math.min(this.diskSize, (last + 1) * this.blockSize);
    const generation = this.generation;
    const writeSeq = this.writeSeq;
    const writing = this.activeWrites > 0;
    this.stats.misses += last - first + 1;
    const data = (async () => {
      const bytes = new Uint8Array(end - start);
      await this.lowerRead(bytes, start);
      return bytes;
    })();
    for (let block = first; block <= last; block++) {
      const blockData = data.then((bytes) => bytes.subarray((block - first) * this.blockSize, Math.min(bytes.length, (block - first + 1) * this.blockSize)));
      blockData.catch(() => {});
      this.pending.set(block, blockData);
    }
    const storing = data.then(
      async (bytes) => {
        for (let block = first; block <= last; block++) {
          const mine = this.pending.get(block);
          if (!writing && mine) {
            const blockBytes = bytes.subarray((block - first) * this.blockSize, Math.min(bytes.length, (block - first + 1) * this.blockSize));
            await this.insert(block, blockBytes, generation, writeSeq);
          }
          if (this.pending.get(block) === mine) this.pending.delete(block);
        }
      },
      () => {
        for (let block = first; block <= last; block++) this.pending.delete(block);
      },
    ).catch((e) => this.request.warn(`cache: could not store blocks ${first}-${last}: ${(e as Error).message}`));
    this.storing.add(storing);
    void storing.finally(() => this.storing.delete(storing));
  }

  /**
   * Stores a block read by a fill that began at `generation` and `writeSeq`: only if no
   * write began or ended and the cache was not emptied since that fill began, since
   * then its bytes may be older than the disk's.
   */
  private async insert(block: number, bytes: Uint8Array, generation: number, writeSeq: number): Promise<void> {
    const unchanged = () => generation === this.generation && writeSeq === this.writeSeq && this.activeWrites === 0;
    if (this.entries.has(block) || !unchanged()) return;
    let slot = this.freeSlots.pop();
    if (slot === undefined) {
      const oldest = this.entries.entries().next();
      // Every slot is being written by other fills: this block is simply not kept.
      if (oldest.done) return;
      const [oldBlock, entry] = oldest.value;
      this.entries.delete(oldBlock);
      slot = entry.slot;
    }
    // A slot being written belongs to no block and to no free list until the write ends.
    this.busySlots.add(slot);
    let published = false;
    try {
      await this.store.write(slot, bytes);
      // Published only once its bytes are in place, and only if nothing changed meanwhile.
      if (unchanged() && !this.entries.has(block)) {
        this.entries.set(block, { slot, crc: this.persist ? zlib.crc32(bytes) : 0, verified: true });
        published = true;
      }
    } finally {
      this.busySlots.delete(slot);
      if (!published) this.freeSlots.push(slot);
    }
  }

  /** Reads the lower provider; a change reported there empties the cache first. */
  private async lowerRead(target: Uint8Array, offset: number): Promise<void> {
    try {
      await this.lower.read(target, offset);
    } catch (e) {
      if (isSourceChanged(e)) this.clear();
      throw e;
    }
  }

  /** Forgets every block (the lower bytes changed). */
  private clear(): void {
    this.generation++;
    this.entries.clear();
    this.pending.clear();
    this.freeSlots.length = 0;
    for (let slot = this.capacity - 1; slot >= 0; slot--) if (!this.busySlots.has(slot)) this.freeSlots.push(slot);
    if (this.persist) {
      this.persist = false;
      fs.promises.unlink(this.indexPath).catch(() => {});
    }
  }

  /** Drops the blocks a write touches, and fills in flight for them. */
  private invalidate(offset: number, length: number): void {
    const first = Math.floor(offset / this.blockSize);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / this.blockSize);
    for (let block = first; block <= last; block++) {
      const entry = this.entries.get(block);
      if (entry) {
        this.entries.delete(block);
        this.freeSlots.push(entry.slot);
      }
      this.pending.delete(block);
    }
  }

  /** Runs a change of the lower bytes with the blocks it touches dropped before and after. */
  private async writeThrough(offset: number, length: number, op: () => Promise<void>): Promise<void> {
    this.activeWrites++;
    this.writeSeq++;
    this.invalidate(offset, length);
    try {
      await op();
    } catch (e) {
      if (isSourceChanged(e)) this.clear();
      throw e;
    } finally {
      this.invalidate(offset, length);
      this.activeWrites--;
      this.writeSeq++;
    }
  }

  async write(buf: Uint8Array, offset: number, options: WriteOptions): Promise<void> {
    if (!this.lower.write) throw new BlockError('EROFS', `cache: ${this.describeLower()} is read-only`);
    await this.writeThrough(offset, buf.length, () => this.lower.write!(buf, offset, options));
  }

  async trim(offset: number, length: number, options: WriteOptions): Promise<void> {
    if (!this.lower.trim) throw new BlockError('EOPNOTSUPP', `cache: ${this.describeLower()} cannot trim`);
    await this.writeThrough(offset, length, () => this.lower.trim!(offset, length, options));
  }

  async zero(offset: number, length: number, options: ZeroOptions): Promise<void> {
    if (!this.lower.zero) throw new BlockError('EOPNOTSUPP', `cache: ${this.describeLower()} cannot zero`);
    await this.writeThrough(offset, length, () => this.lower.zero!(offset, length, options));
  }

  async flush(): Promise<void> {
    if (this.lower.flush) await this.lower.flush();
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    if (this.lower.extents) return this.lower.extents(offset, length);
    return [{ offset, length, type: 'data' }];
  }

  async allocatedBytes(): Promise<number | undefined> {
    return this.lower.allocatedBytes?.();
  }

  describe(): Record<string, unknown> {
    return {
      size: formatSize(this.capacity * this.blockSize),
      block: formatSize(this.blockSize),
      cachedBlocks: this.entries.size,
      hits: this.stats.hits,
      misses: this.stats.misses,
      ...(this.filePath ? { file: this.filePath, persistent: this.persist } : {}),
    };
  }

  async close(): Promise<void> {
    try {
      if (this.store) {
        await Promise.allSettled([...this.storing]);
        if (this.persist) await this.saveIndex().catch((e) => this.request.warn(`cache: could not save ${this.indexPath}: ${(e as Error).message}`));
        await this.store.close();
      }
    } finally {
      await this.lower.close();
    }
  }
}
