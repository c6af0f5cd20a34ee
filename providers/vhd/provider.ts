/**
 * vhd: Virtual Hard Disk images (fixed, dynamic, differencing), read and write, over any
 * source provider (its `lower`): a file, memory, a web server.
 *
 * Reads of dynamic and differencing images go block by block through the BAT and each
 * block's sector bitmap; a sector whose bit is 0 reads as zeros (dynamic) or from the
 * parent (differencing). Writes allocate blocks at the end of the file and defer the
 * BAT and bitmap updates to the next flush; `allocator` comments explain the order that
 * keeps a killed writer's image openable and every flushed write readable.
 */
import * as path from 'node:path';
import { BlockError, CorruptImageError } from '../../core/errors';
import { OpenRequest } from '../../core/open-request';
import type { Capabilities, DiskInfo, Extent, Provider, WriteOptions, ZeroOptions } from '../../core/provider';
import { forEachPiece } from '../../core/pieces';
import { provider } from '../../core/registry';
import { bitRuns, setBits, testBit } from './bitmap';
import { BitmapCache } from './bitmap-cache';
import { DiskType, diskTypeName, FOOTER_SIZE, isFooterCookie, LEGACY_FOOTER_SIZE, serializeFooter } from './footer';
import { HEADER_COOKIE } from './header';
import { loadLayout, UNALLOCATED, type VhdLayout } from './layout';
import { parentCandidates } from './locators';
import { checkVhd, vhdReferences } from './inspect';
import { Mutex } from './mutex';
import { sameUuid, uuidText } from './uuid';

/** Largest buffer used to write zeros when the lower provider cannot zero natively. */
const ZERO_CHUNK = 1 << 20;
/** Bytes of clean sector bitmaps kept in memory (8192 bitmaps of 2 MiB blocks; fewer for larger blocks). */
const BITMAP_CACHE_BYTES = 4 * 1024 * 1024;
/** extents() answers at most this many runs per call (it may stop early). */
const MAX_EXTENT_RUNS = 4096;

export function probeVhd({ head, tail }: { head: Uint8Array; tail: Uint8Array }): boolean {
  if (tail.length >= FOOTER_SIZE && isFooterCookie(tail, tail.length - FOOTER_SIZE)) return true;
  if (tail.length >= LEGACY_FOOTER_SIZE && isFooterCookie(tail, tail.length - LEGACY_FOOTER_SIZE)) return true;
  // A dynamic image whose EOF footer is damaged: the copy at 0 and the header right after.
  return head.length >= 520 && isFooterCookie(head, 0) && Buffer.from(head.subarray(512, 520)).toString('latin1') === HEADER_COOKIE;
}

@provider({
  name: 'vhd',
  kind: 'format',
  description: 'VHD images: fixed, dynamic and differencing; read and write (vhd:SPEC)',
  probe: probeVhd,
  // The footer is at the end: after formats recognised by their first bytes.
  probePriority: -10,
  options: ['ignore-parent-uuid'],
  references: vhdReferences,
  check: checkVhd,
})
export class VhdProvider implements Provider {
  readonly name = 'vhd';
  readonly lower: Provider;
  backing?: Provider;
  layout!: VhdLayout;
  private bat!: Uint32Array;
  private bitmaps!: BitmapCache;
  private readonly dirtyBat = new Set<number>();
  private readonly mutex = new Mutex();
  /** Where the next block goes: the footer's position, which then moves past the block. */
  private nextBlockAt = 0;
  private readOnly: boolean;
  private batmapCleared = false;
  private closed = false;
  /**
   * Whether the container can grow: a file does when written past its end; a RAM disk or
   * any other fixed-size source cannot, and then only blocks already allocated are written
   * (a new block is refused with ENOSPC and zeroing keeps blocks instead of freeing them).
   */
  private readonly lowerGrows: boolean;

  constructor(private readonly request: OpenRequest) {
    if (!request.lower) throw new BlockError('EINVAL', `vhd needs an image to read (vhd:/path/disk.vhd) in spec '${request.spec}'`);
    this.lower = request.lower;
    this.readOnly = request.readOnly || request.lower.info().readOnly;
    const where = request.lower.location;
    this.lowerGrows = !!where && path.isAbsolute(where);
  }

  get location(): string | undefined {
    return this.lower.location;
  }

  get type(): DiskType {
    return this.layout.footer.diskType;
  }

  /** The footer's unique id: a differencing child names its parent by it. */
  get uniqueId(): Buffer {
    return this.layout.footer.uniqueId;
  }

  private get where(): string {
    return `vhd '${this.location ?? this.request.arg}'`;
  }

  async open(): Promise<void> {
    const { limits, memory } = this.request;
    this.layout = await loadLayout(this.lower, this.where, { warn: (m) => this.request.warn(`${this.where}: ${m}`), limits, memory });
    const { footer, header } = this.layout;
    if (footer.savedState && !this.readOnly) {
      throw new BlockError('EROFS', `${this.where} holds a saved VM state (footer 'saved state' is set): it may be opened read-only only`);
    }
    if (footer.diskType === DiskType.Fixed) return;
    this.bat = this.layout.bat!;
    const cachedBitmaps = Math.max(1, Math.floor(BITMAP_CACHE_BYTES / this.layout.bitmapBytes));
    memory.reserve(cachedBitmaps * this.layout.bitmapBytes, `${this.where}: bitmap cache`);
    this.bitmaps = new BitmapCache(this.lower, this.layout.bitmapBytes, (block) => {
      const entry = this.bat[block];
      return entry === UNALLOCATED ? undefined : entry;
    }, cachedBitmaps);
    this.nextBlockAt = Math.max(this.layout.dataEnd, Math.ceil(this.layout.footerOffset / 512) * 512);
    if (footer.diskType === DiskType.Differencing) await this.openParent(header!);
    if (this.layout.footerFromCopy && !this.readOnly) {
      // Repair: put the (good) footer back at the end before anything else moves it.
      await this.writeLower(this.footerBytes(), this.nextBlockAt);
      await this.lower.flush?.();
    }
  }

  private async openParent(header: NonNullable<VhdLayout['header']>): Promise<void> {
    const candidates = await parentCandidates(this.lower, header, this.layout.footerOffset, this.request.limits);
    if (candidates.length === 0) {
      throw new CorruptImageError('parent locator', `${this.where} is a differencing image but names no parent (no usable locator, empty parent name)`);
    }
    const tried: string[] = [];
    let firstRefusal: BlockError | undefined;
    for (const candidate of candidates) {
      try {
        this.backing = await this.request.openBacking(candidate.name, { format: 'vhd' });
        break;
      } catch (e) {
        const err = e instanceof BlockError ? e : new BlockError('EIO', String(e));
        // A missing file or a refused one: try the next locator; anything else is the parent's own problem.
        if (err.code !== 'ENOENT' && err.code !== 'EACCES') throw err;
        if (err.code === 'EACCES') firstRefusal ??= err;
        tried.push(`${candidate.source} '${candidate.name}' (${err.message})`);
      }
    }
    if (!this.backing) {
      if (firstRefusal) throw firstRefusal;
      throw new BlockError('ENOENT', `${this.where}: parent not found; tried ${tried.join('; ')}`);
    }
    const parent = this.backing;
    const parentId = parent.name === 'vhd' ? (parent as VhdProvider).uniqueId : undefined;
    if (!parentId || !sameUuid(parentId, header.parentUniqueId)) {
      const found = parentId ? `has unique id ${uuidText(parentId)}` : `is not a VHD (${parent.name})`;
      const message = `${this.where} expects parent ${uuidText(header.parentUniqueId)}, but ${parent.location ?? 'its parent'} ${found}`;
      if (this.request.options['ignore-parent-uuid'] !== '1') {
        await parent.close().catch(() => {});
        this.backing = undefined;
        throw new CorruptImageError('parent unique id', `${message} (open with vhd,ignore-parent-uuid=1:... to use it anyway)`);
      }
      this.request.warn(`${message}; used anyway (ignore-parent-uuid=1)`);
    }
  }

  info(): DiskInfo {
    return { size: this.layout.footer.currentSize, logicalBlockSize: 512, physicalBlockSize: 4096, readOnly: this.readOnly };
  }

  capabilities(): Capabilities {
    const write = !this.readOnly;
    return { write, flush: true, fua: write, trim: write, zero: write, extents: true, multiConn: true, concurrent: true };
  }

  // ---- reading -----------------------------------------------------------------------

  async read(buf: Uint8Array, offset: number): Promise<void> {
    if (this.type === DiskType.Fixed) return this.lower.read(buf, offset);
    const jobs: Array<Promise<void>> = [];
    this.forEachBlock(offset, buf.length, (block, within, length, done) => {
      jobs.push(this.readInBlock(buf.subarray(done, done + length), block, within));
    });
    await Promise.all(jobs);
  }

  private async readInBlock(view: Uint8Array, block: number, within: number): Promise<void> {
    const base = block * this.blockSize;
    const entry = this.bat[block];
    if (entry === UNALLOCATED) return this.readBelow(view, base + within);
    const map = await this.bitmaps.get(block);
    const dataAt = entry * 512 + this.layout.bitmapBytes;
    const first = Math.floor(within / 512);
    const last = Math.ceil((within + view.length) / 512);
    const jobs: Array<Promise<void>> = [];
    for (const [sector, count, present] of bitRuns(map, first, last - first)) {
      const from = Math.max(sector * 512, within);
      const to = Math.min((sector + count) * 512, within + view.length);
      const part = view.subarray(from - within, to - within);
      jobs.push(present ? this.lower.read(part, dataAt + from) : this.readBelow(part, base + from));
    }
    await Promise.all(jobs);
  }

  /** What lies under a sector that this image does not hold: zeros, or the parent's bytes. */
  private async readBelow(view: Uint8Array, offset: number): Promise<void> {
    if (!this.backing) {
      view.fill(0);
      return;
    }
    const parentSize = this.backing.info().size;
    const inside = Math.max(0, Math.min(view.length, parentSize - offset));
    if (inside > 0) await this.backing.read(view.subarray(0, inside), offset);
    if (inside < view.length) view.fill(0, inside);
  }

  // ---- writing -----------------------------------------------------------------------

  write(buf: Uint8Array, offset: number, options: WriteOptions): Promise<void> {
    this.checkWritable();
    return this.mutex.run(async () => {
      if (this.type === DiskType.Fixed) return this.writeLower(buf, offset, !!options.fua);
      const pieces: Array<[number, number, number, number]> = [];
      this.forEachBlock(offset, buf.length, (block, within, length, done) => pieces.push([block, within, length, done]));
      for (const [block, within, length, done] of pieces) await this.writeInBlock(buf.subarray(done, done + length), block, within);
      if (options.fua) await this.flushLocked();
    });
  }

  /** Writes whole sectors into one block, read-modify-writing partial sectors at the edges. */
  private async writeInBlock(data: Uint8Array, block: number, within: number): Promise<void> {
    const first = Math.floor(within / 512);
    const last = Math.ceil((within + data.length) / 512);
    let sectors = data;
    if (within % 512 !== 0 || data.length % 512 !== 0) {
      // A partial sector keeps its other bytes: what reads there now (from this image or below).
      sectors = new Uint8Array((last - first) * 512);
      const base = block * this.blockSize;
      await this.readEdge(sectors, base, first, last, within, data.length);
      sectors.set(data, within - first * 512);
    }
    const entry = await this.ensureBlock(block);
    if (this.type === DiskType.Dynamic) {
      // Dynamic: bits before data, so a bit-0 sector never holds data (see bitsBeforeData).
      await this.bitsBeforeData(block, entry, first, last - first);
      await this.writeLower(sectors, entry * 512 + this.layout.bitmapBytes + first * 512);
    } else {
      // Differencing: data before bits, so a set bit never hides the parent behind bytes not yet written.
      await this.writeLower(sectors, entry * 512 + this.layout.bitmapBytes + first * 512);
      await this.markPresent(block, first, last - first, true);
    }
  }

  /**
   * In a dynamic image a sector whose bit is 0 must hold zeros on disk (readers that ignore
   * the bitmap, like qemu, read the data area; 7-Zip reports a data error otherwise). The
   * bytes under a bit-0 sector are zeros, so setting the bit first changes nothing a reader
   * sees; the data written after it is then covered whether or not it reaches the disk.
   * Blocks we allocate have every bit set from the start (their data area is a hole), so
   * this costs a bitmap write and a flush only for blocks other producers left partly set.
   */
  private async bitsBeforeData(block: number, entry: number, first: number, count: number): Promise<void> {
    const map = await this.bitmaps.get(block);
    let missing = false;
    for (let s = first; s < first + count && !missing; s++) missing = !testBit(map, s);
    if (!missing) return;
    setBits(map, first, count, true);
    if (this.bitmaps.dirty.has(block)) return; // not on disk yet: the flush writes it before the BAT entry
    await this.writeLower(map, entry * 512);
    await this.lower.flush?.();
  }

  private async readEdge(sectors: Uint8Array, base: number, first: number, last: number, within: number, length: number): Promise<void> {
    const headPartial = within % 512 !== 0;
    const tailPartial = (within + length) % 512 !== 0;
    const size = this.info().size;
    const readSector = async (sector: number, into: Uint8Array) => {
      const at = base + sector * 512;
      const n = Math.max(0, Math.min(512, size - at));
      if (n > 0) await this.read(into.subarray(0, n), at);
    };
    if (headPartial) await readSector(first, sectors.subarray(0, 512));
    if (tailPartial && (last - 1 !== first || !headPartial)) await readSector(last - 1, sectors.subarray((last - 1 - first) * 512));
  }

  /**
   * The block's BAT entry, allocating the block if needed. Order (see allocator notes in
   * README.md): the footer is written at the new end of the file first, so the file always
   * ends with a valid footer; the block itself (bitmap sector over the old footer, data in
   * the new hole) is written afterwards; the BAT entry reaches the disk only at the next
   * flush, after the block's data and bitmap are durable. A writer killed before that flush
   * leaves an unreferenced block (harmless), never a BAT entry pointing at garbage.
   */
  private async ensureBlock(block: number): Promise<number> {
    const existing = this.bat[block];
    if (existing !== UNALLOCATED) return existing;
    const at = this.nextBlockAt;
    const end = at + this.layout.bitmapBytes + this.blockSize;
    if (end / 512 > 0xfffffffe) throw new BlockError('EFBIG', `${this.where}: a new block at ${at} would lie past what a BAT entry can address`);
    if (!this.lowerGrows && end + FOOTER_SIZE > this.lower.info().size) {
      throw new BlockError('ENOSPC', `${this.where}: block ${block} is not allocated and the ${this.lower.name} container cannot grow to hold it (only a file can)`);
    }
    await this.writeLower(this.footerBytes(), end);
    this.nextBlockAt = end;
    this.bat[block] = at / 512;
    this.dirtyBat.add(block);
    // Dynamic: every bit set (the data area is a hole, so unwritten sectors read as zeros
    // either way); differencing: no bit set, the parent shows through until written.
    this.bitmaps.install(block, new Uint8Array(this.layout.bitmapBytes).fill(this.type === DiskType.Dynamic ? 0xff : 0));
    return at / 512;
  }

  private async markPresent(block: number, first: number, count: number, present: boolean): Promise<void> {
    const map = await this.bitmaps.get(block);
    for (let s = first; s < first + count; s++) {
      if (testBit(map, s) !== present) {
        setBits(map, first, count, present);
        this.bitmaps.markDirty(block);
        return;
      }
    }
  }

  async flush(): Promise<void> {
    if (this.readOnly) return this.lower.flush?.();
    return this.mutex.run(() => this.flushLocked());
  }

  /**
   * Makes every write so far durable, in the order that never lets metadata point at
   * bytes that are not on disk yet: data and footers, then bitmaps, then BAT entries.
   */
  private async flushLocked(): Promise<void> {
    if (this.type !== DiskType.Fixed && (this.bitmaps.dirty.size > 0 || this.dirtyBat.size > 0)) {
      await this.lower.flush?.();
      if (this.bitmaps.dirty.size > 0) {
        for (const block of [...this.bitmaps.dirty]) {
          const entry = this.bat[block];
          const map = this.bitmaps.peek(block);
          if (entry !== UNALLOCATED && map) await this.writeLower(map, entry * 512);
          this.bitmaps.dirty.delete(block);
        }
        if (this.dirtyBat.size > 0) await this.lower.flush?.();
      }
      if (this.dirtyBat.size > 0) {
        await this.clearBatmap();
        await this.writeBatSectors([...this.dirtyBat]);
        this.dirtyBat.clear();
      }
    }
    await this.lower.flush?.();
  }

  private async writeBatSectors(blocks: number[]): Promise<void> {
    const perSector = 128;
    const sectors = [...new Set(blocks.map((b) => Math.floor(b / perSector)))].sort((a, b) => a - b);
    for (const s of sectors) {
      const bytes = Buffer.alloc(512, 0xff);
      for (let k = 0; k < perSector; k++) {
        const i = s * perSector + k;
        if (i >= this.bat.length) break;
        bytes.writeUInt32BE(this.bat[i], k * 4);
      }
      await this.writeLower(bytes, this.layout.header!.tableOffset + s * 512);
    }
  }

  /**
   * blktap's batmap marks blocks whose every sector is present. We do not maintain it, so
   * before the first BAT change we mark every block "not known full" (always true).
   */
  private async clearBatmap(): Promise<void> {
    const batmap = this.layout.batmap;
    if (!batmap || this.batmapCleared) return;
    const zeros = Buffer.alloc(batmap.mapSectors * 512);
    await this.writeLower(zeros, batmap.mapOffset);
    const header = Buffer.alloc(512);
    await this.lower.read(header, batmap.headerOffset);
    // The map's checksum: one's complement of its byte sum (0 for an all-zero map).
    header.writeUInt32BE(0xffffffff, 24);
    await this.writeLower(header, batmap.headerOffset);
    this.batmapCleared = true;
  }

  async trim(offset: number, length: number, options: WriteOptions): Promise<void> {
    this.checkWritable();
    await this.mutex.run(async () => {
      if (this.type === DiskType.Fixed) {
        if (this.lower.capabilities().trim && this.lower.trim) await this.lower.trim(offset, length, {});
      } else if (this.type === DiskType.Dynamic) {
        // Unwritten sectors of a dynamic disk read as zeros, so freeing is always safe.
        await this.zeroDynamic(offset, length);
      }
      // A differencing child keeps trimmed sectors: freeing them would bring the parent's data back.
      if (options.fua) await this.flushLocked();
    });
  }

  async zero(offset: number, length: number, options: ZeroOptions): Promise<void> {
    this.checkWritable();
    await this.mutex.run(async () => {
      if (this.type === DiskType.Fixed) await this.zeroLower(offset, length, !!options.mayTrim);
      else if (this.type === DiskType.Dynamic) await this.zeroDynamic(offset, length);
      else await this.zeroDifferencing(offset, length);
      if (options.fua) await this.flushLocked();
    });
  }

  /** Dynamic: whole blocks are freed (on a file), partly covered ones get zeros in place. */
  private async zeroDynamic(offset: number, length: number): Promise<void> {
    const pieces: Array<[number, number, number]> = [];
    this.forEachBlock(offset, length, (block, within, n) => pieces.push([block, within, n]));
    for (const [block, within, n] of pieces) {
      const entry = this.bat[block];
      if (entry === UNALLOCATED) continue;
      const blockBytes = Math.min(this.blockSize, this.info().size - block * this.blockSize);
      if (within === 0 && n >= blockBytes && this.lowerGrows) {
        // Free it: the BAT entry changes at the next flush; until then the old entry points
        // at a block whose bitmap is zeroed here, which reads as zeros too.
        this.bat[block] = UNALLOCATED;
        this.dirtyBat.add(block);
        this.bitmaps.forget(block);
        // Data first, then the bitmap: a bit-0 sector never holds data, even after a crash.
        await this.zeroLowerRange(entry * 512 + this.layout.bitmapBytes, Math.ceil(blockBytes / 512) * 512, true);
        await this.zeroLowerRange(entry * 512, this.layout.bitmapBytes, true);
        continue;
      }
      // Zeros in place; the bits stay as they are (a zero sector reads as zeros whatever its bit).
      await this.zeroLowerRange(entry * 512 + this.layout.bitmapBytes + within, n, true);
    }
  }

  /** Differencing: zeros must hide the parent, so the sectors become present and hold zeros. */
  private async zeroDifferencing(offset: number, length: number): Promise<void> {
    const pieces: Array<[number, number, number]> = [];
    this.forEachBlock(offset, length, (block, within, n) => pieces.push([block, within, n]));
    for (const [block, within, n] of pieces) {
      const span = sectorSpan(within, n);
      // Partly covered sectors go through the write path (read-modify-write).
      for (const [from, to] of span.edges) await this.writeInBlock(new Uint8Array(to - from), block, from);
      if (span.last > span.first) {
        const entry = await this.ensureBlock(block);
        await this.zeroLowerRange(entry * 512 + this.layout.bitmapBytes + span.first * 512, (span.last - span.first) * 512, true);
        await this.markPresent(block, span.first, span.last - span.first, true);
      }
    }
  }

  private async zeroLower(offset: number, length: number, mayTrim: boolean): Promise<void> {
    await this.zeroLowerRange(offset, length, mayTrim);
  }

  /** Zeros bytes of the lower provider: natively when it can, else by writing zeros. */
  private async zeroLowerRange(offset: number, length: number, mayTrim: boolean): Promise<void> {
    if (length <= 0) return;
    if (this.lower.capabilities().zero && this.lower.zero) {
      try {
        await this.lower.zero(offset, length, { mayTrim, fast: true });
        return;
      } catch (e) {
        if (!(e instanceof BlockError) || e.code !== 'EOPNOTSUPP') throw e;
      }
    }
    const zeros = new Uint8Array(Math.min(length, ZERO_CHUNK));
    for (let done = 0; done < length; done += zeros.length) {
      await this.writeLower(zeros.subarray(0, Math.min(zeros.length, length - done)), offset + done);
    }
  }

  // ---- allocation map ------------------------------------------------------------------

  async extents(offset: number, length: number): Promise<Extent[]> {
    const runs: Extent[] = [];
    const push = (start: number, len: number, type: Extent['type']) => {
      const prev = runs[runs.length - 1];
      if (prev && prev.type === type && prev.offset + prev.length === start) prev.length += len;
      else runs.push({ offset: start, length: len, type });
    };
    if (this.type === DiskType.Fixed) {
      if (this.lower.capabilities().extents && this.lower.extents) {
        for (const e of await this.lower.extents(offset, length)) {
          const end = Math.min(e.offset + e.length, offset + length);
          if (end > e.offset) push(e.offset, end - e.offset, e.type);
        }
        return runs;
      }
      return [{ offset, length, type: 'data' }];
    }
    const pieces: Array<[number, number, number]> = [];
    this.forEachBlock(offset, length, (block, within, n) => pieces.push([block, within, n]));
    for (const [block, within, n] of pieces) {
      if (runs.length >= MAX_EXTENT_RUNS) break;
      const base = block * this.blockSize;
      if (this.bat[block] === UNALLOCATED) {
        await this.extentsBelow(base + within, n, push);
        continue;
      }
      const map = await this.bitmaps.get(block);
      const first = Math.floor(within / 512);
      const last = Math.ceil((within + n) / 512);
      for (const [sector, count, present] of bitRuns(map, first, last - first)) {
        const from = Math.max(sector * 512, within);
        const to = Math.min((sector + count) * 512, within + n);
        if (present) push(base + from, to - from, 'data');
        else await this.extentsBelow(base + from, to - from, push, 'zero');
      }
    }
    return runs;
  }

  private async extentsBelow(offset: number, length: number, push: (o: number, l: number, t: Extent['type']) => void, own: Extent['type'] = 'hole'): Promise<void> {
    const parent = this.backing;
    if (!parent) return push(offset, length, own);
    const parentSize = parent.info().size;
    const inside = Math.max(0, Math.min(length, parentSize - offset));
    if (inside > 0) {
      if (parent.capabilities().extents && parent.extents) {
        let cursor = offset;
        while (cursor < offset + inside) {
          const got = await parent.extents(cursor, offset + inside - cursor);
          if (got.length === 0) break;
          for (const e of got) {
            const from = Math.max(e.offset, cursor);
            const to = Math.min(e.offset + e.length, offset + inside);
            if (to > from) push(from, to - from, e.type);
            cursor = Math.max(cursor, to);
          }
        }
        if (cursor < offset + inside) push(cursor, offset + inside - cursor, 'data');
      } else {
        push(offset, inside, 'data');
      }
    }
    if (inside < length) push(offset + inside, length - inside, 'hole');
  }

  // ---- facts -------------------------------------------------------------------------

  describe(): Record<string, unknown> {
    const { footer, header } = this.layout;
    const facts: Record<string, unknown> = {
      type: diskTypeName(footer.diskType),
      creator: `${footer.creatorApp.replace(/\0/g, '\\0')} ${footer.creatorVersion >>> 16}.${footer.creatorVersion & 0xffff}`,
      uniqueId: uuidText(footer.uniqueId),
      geometry: `${footer.geometry.cylinders}/${footer.geometry.heads}/${footer.geometry.sectorsPerTrack}`,
    };
    if (header) {
      facts.blockSize = header.blockSize;
      facts.batEntries = header.maxTableEntries;
      facts.allocatedBlocks = this.bat.reduce((n, e) => n + (e === UNALLOCATED ? 0 : 1), 0);
    }
    if (footer.diskType === DiskType.Differencing) {
      facts.parentUniqueId = uuidText(header!.parentUniqueId);
      facts.parentName = header!.parentName;
    }
    if (this.layout.footerFromCopy) facts.footer = 'repaired from the copy at offset 0';
    if (this.layout.legacyFooter) facts.footer = 'legacy 511-byte footer';
    return facts;
  }

  async allocatedBytes(): Promise<number | undefined> {
    return this.lower.allocatedBytes?.();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (!this.readOnly && this.layout) await this.mutex.run(() => this.flushLocked());
    } finally {
      await this.backing?.close().catch(() => {});
      await this.lower.close();
    }
  }

  // ---- internals ---------------------------------------------------------------------

  get blockSize(): number {
    return this.layout.header!.blockSize;
  }

  /** Whether the block holds the sector (for tools: coalesce, check). */
  async sectorPresent(block: number, sector: number): Promise<boolean> {
    if (this.bat[block] === UNALLOCATED) return false;
    return testBit(await this.bitmaps.get(block), sector);
  }

  /** Runs [offset, length] of the bytes this image itself holds (dynamic/differencing), in order. */
  async *ownRuns(): AsyncGenerator<[number, number]> {
    const size = this.info().size;
    for (let block = 0; block < Math.ceil(size / this.blockSize); block++) {
      if (this.bat[block] === UNALLOCATED) continue;
      const base = block * this.blockSize;
      const sectors = Math.ceil(Math.min(this.blockSize, size - base) / 512);
      for (const [sector, count, present] of bitRuns(await this.bitmaps.get(block), 0, sectors)) {
        if (present) yield [base + sector * 512, Math.min(count * 512, size - base - sector * 512)];
      }
    }
  }

  private footerBytes(): Buffer {
    return serializeFooter({ ...this.layout.footer });
  }

  private writeLower(buf: Uint8Array, offset: number, fua = false): Promise<void> {
    if (!this.lower.write) throw new BlockError('EROFS', `${this.where}: ${this.lower.name} cannot write`);
    return this.lower.write(buf, offset, { fua });
  }

  private checkWritable(): void {
    if (this.readOnly) throw new BlockError('EROFS', `${this.where} is open read-only`);
  }

  forEachBlock(offset: number, length: number, fn: (block: number, within: number, length: number, done: number) => void): void {
    forEachPiece(offset, length, this.blockSize, fn);
  }
}

/**
 * The whole sectors [first, last) inside the byte range [within, within+n) of a block,
 * and the byte ranges of the partly covered sectors at its edges.
 */
export function sectorSpan(within: number, n: number): { first: number; last: number; edges: Array<[number, number]> } {
  const end = within + n;
  const first = Math.ceil(within / 512);
  const last = Math.floor(end / 512);
  if (first > last) return { first, last: first, edges: [[within, end]] };
  const edges: Array<[number, number]> = [];
  if (within < first * 512) edges.push([within, first * 512]);
  if (last * 512 < end) edges.push([last * 512, end]);
  return { first, last, edges };
}
