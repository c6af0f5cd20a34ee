/**
 * qcow2: reads qemu's copy-on-write format (versions 2 and 3) over any source provider,
 * read-only. Backing files are opened through the registry relative to the image's own
 * location, so an image on a web server finds its backing file there too.
 *
 * Modules: header.ts (header and open-time checks), extensions.ts, snapshots.ts,
 * mapping.ts (L1/L2 lookup, L2 cache), decompress.ts (zlib and zstd clusters), lru.ts.
 */
import { BlockError, CorruptImageError } from '../../core/errors';
import { OpenRequest } from '../../core/open-request';
import type { Capabilities, DiskInfo, Extent, Provider } from '../../core/provider';
import { provider } from '../../core/registry';
import { parseSize } from '../../core/size';
import { decompressCluster, DecompressError } from './decompress';
import {
  AUTOCLEAR,
  checkL1Fits,
  checkTable,
  COMPAT_LAZY_REFCOUNTS,
  hasBit,
  INCOMPAT,
  looksLikeQcow2,
  MAX_CLUSTER_BITS,
  parseHeader,
  type Qcow2Header,
} from './header';
import { checkQcow2, qcow2References } from './check';
import { BufferPool } from './buffers';
import { ClusterCache } from './lru';
import { ClusterMap, type Run } from './mapping';
import { readSnapshotTable, type Snapshot } from './snapshots';

/** Default L2 cache: 4 MiB of tables maps 32 GiB with 64 KiB clusters. */
const DEFAULT_L2_CACHE_BYTES = 4 * 1024 * 1024;
/** Decompressed clusters kept for small reads that hit the same cluster again. */
const DECOMPRESSED_CACHE_BYTES = 4 * 1024 * 1024;
/**
 * Buffers kept for the stored bytes of compressed clusters, in bytes. Each holds one
 * cluster and a kibibyte: what a qemu-written compressed cluster rounded to sectors takes.
 */
const INPUT_BUFFER_BYTES = 2 * 1024 * 1024;
/** A resolved promise for the reads that finish without waiting. */
const DONE: Promise<void> = Promise.resolve();
/** extents() stops after this many L2 tables per call (the caller asks again from there). */
const EXTENTS_TABLES_PER_CALL = 64;
/**
 * Neighbouring clusters of one request are fetched from the image file in one read when
 * the gap between them is at most this (qemu-img writes clusters in guest order, so a
 * converted image's stored and compressed clusters lie back to back) ...
 */
const COALESCE_GAP = 64 * 1024;
/** ... and the merged read is at most this long. */
const COALESCE_MAX = 4 * 1024 * 1024;
/** Spare merge buffers kept between requests. */
const SPARE_SPANS = 4;

/** One run of a request and the part of the caller's buffer it fills. */
interface Piece {
  run: Run;
  slice: Uint8Array;
}

/** Pieces whose bytes come from one stretch [start, end) of the image file. */
interface Span {
  start: number;
  end: number;
  pieces: Piece[];
}

/** Names qemu writes in the backing-format extension → our provider names. */
const BACKING_FORMATS: Record<string, string> = { raw: 'raw', file: 'raw', qcow2: 'qcow2', vpc: 'vhd', vhd: 'vhd' };

@provider({
  name: 'qcow2',
  kind: 'format',
  description: 'qemu copy-on-write image, v2/v3, read-only (options snapshot=NAME, l2-cache-size=SIZE)',
  probe: ({ head }) => looksLikeQcow2(head),
  options: ['snapshot', 'l2-cache-size'],
  probePriority: 10,
  references: qcow2References,
  check: checkQcow2,
})
export class Qcow2Provider implements Provider {
  readonly name = 'qcow2';
  readonly lower: Provider;
  backing?: Provider;
  private dataFile?: Provider;
  private header!: Qcow2Header;
  private imageSize = 0;
  private diskSize = 0;
  private map!: ClusterMap;
  private snapshots: Snapshot[] = [];
  private openedSnapshot?: Snapshot;
  private l2CacheBytes = DEFAULT_L2_CACHE_BYTES;
  private decompressed!: ClusterCache;
  /** Reused buffers for the stored bytes of compressed clusters. */
  private inputs!: BufferPool;
  private concurrent = true;
  /** Merge buffers for readSpan, reused between requests. */
  private readonly spares: Uint8Array[] = [];

  constructor(private readonly request: OpenRequest) {
    if (!request.lower) throw new BlockError('EINVAL', `qcow2 needs an image to read (qcow2:/path/x.qcow2) in spec '${request.spec}'`);
    this.lower = request.lower;
    if (request.options['l2-cache-size'] !== undefined) {
      this.l2CacheBytes = parseSize(request.options['l2-cache-size'], `qcow2 l2-cache-size in spec '${request.spec}'`);
    }
  }

  get location(): string | undefined {
    return this.lower.location;
  }

  private get where(): string {
    return this.lower.location ?? this.request.spec;
  }

  async open(): Promise<void> {
    this.imageSize = this.lower.info().size;
    const first = await this.readImage(0, Math.min(this.imageSize, 2 ** MAX_CLUSTER_BITS));
    const header = this.located(() => parseHeader(first, this.imageSize, this.request.limits));
    this.header = header;
    const extendedL2 = hasBit(header.incompatibleFeatures, INCOMPAT.extendedL2);
    const externalData = hasBit(header.incompatibleFeatures, INCOMPAT.externalDataFile);

    if (header.nbSnapshots > 0) {
      const table = readSnapshotTable((o, n) => this.readImage(o, n), header.snapshotsOffset, header.nbSnapshots, this.imageSize, this.request.limits);
      this.snapshots = await table.catch((e: unknown) => this.located(() => { throw e; }));
    }

    // The active disk, or a snapshot asked for by name (or id).
    let l1Offset = header.l1TableOffset;
    let l1Size = header.l1Size;
    this.diskSize = header.size;
    const wanted = this.request.options.snapshot;
    if (wanted !== undefined) {
      const snap = this.snapshots.find((s) => s.name === wanted) ?? this.snapshots.find((s) => s.id === wanted);
      if (!snap) {
        const known = this.snapshots.map((s) => s.name).join(', ') || 'none';
        throw new BlockError('ENOENT', `qcow2: ${this.where} has no snapshot '${wanted}' (snapshots: ${known})`);
      }
      this.openedSnapshot = snap;
      l1Offset = snap.l1TableOffset;
      l1Size = snap.l1Size;
      this.diskSize = snap.diskSize ?? header.size;
      this.located(() => {
        checkL1Fits(l1Size, this.diskSize, header.clusterBits, extendedL2, 'snapshot_l1_size');
        checkTable('snapshot_l1_table_offset', l1Offset, l1Size * 8, header.clusterSize, this.imageSize);
      });
    }
    // Tables and cache bounds are charged to the VBD's metadata budget before they exist.
    this.request.memory.reserve(l1Size * 8 + this.l2CacheBytes + DECOMPRESSED_CACHE_BYTES + INPUT_BUFFER_BYTES + header.clusterSize + 1024, `qcow2: ${this.where}: L1 table and caches`);
    const l1 = l1Size > 0 ? await this.readImage(l1Offset, l1Size * 8) : new Uint8Array(0);

    try {
      if (externalData) await this.openDataFile();
      if (header.backingFile !== undefined) await this.openBackingFile(header.backingFile);
    } catch (e) {
      await this.closeOpened();
      throw e;
    }

    this.map = new ClusterMap(
      { clusterBits: header.clusterBits, extendedL2, externalData, imageSize: this.imageSize, location: this.where },
      l1,
      (o, n) => this.readImage(o, n),
      Math.floor(this.l2CacheBytes / header.clusterSize),
    );
    this.decompressed = new ClusterCache(Math.max(1, Math.floor(DECOMPRESSED_CACHE_BYTES / header.clusterSize)), header.clusterSize);
    const inputSize = header.clusterSize + 1024;
    this.inputs = new BufferPool(inputSize, Math.max(1, Math.floor(INPUT_BUFFER_BYTES / inputSize)));
    const layers = [this.lower, this.backing, this.dataFile].filter((p): p is Provider => !!p);
    this.concurrent = layers.every((p) => p.capabilities().concurrent);
  }

  /** Runs a parser whose messages start with 'qcow2: ', putting the image's location after it. */
  private located<T>(parse: () => T): T {
    try {
      return parse();
    } catch (e) {
      if (e instanceof BlockError && e.message.startsWith('qcow2: ') && !e.message.startsWith(`qcow2: ${this.where}`)) {
        e.message = `qcow2: ${this.where}: ${e.message.slice(7)}`;
      }
      throw e;
    }
  }

  private async openDataFile(): Promise<void> {
    const name = this.header.extensions.dataFile;
    if (name === undefined) throw new CorruptImageError('data_file', `qcow2: ${this.where} needs an external data file but names none`);
    if (hasBit(this.header.autoclearFeatures, AUTOCLEAR.rawExternalData) && this.header.backingFile !== undefined) {
      throw new CorruptImageError('autoclear_features', `qcow2: ${this.where} has a raw external data file and a backing file, which cannot go together`);
    }
    this.dataFile = await this.request.openBacking(name, { format: 'raw', role: 'data-file' });
  }

  private async openBackingFile(name: string): Promise<void> {
    const named = this.header.extensions.backingFormat;
    const format = named === undefined ? undefined : Object.hasOwn(BACKING_FORMATS, named) ? BACKING_FORMATS[named] : named;
    try {
      this.backing = await this.request.openBacking(name, format ? { format } : {});
    } catch (e) {
      if (e instanceof BlockError) {
        throw new BlockError(e.code, `qcow2: ${this.where}: cannot open backing file '${name}'${format ? ` (${format})` : ''}: ${e.message}`, { cause: e });
      }
      throw e;
    }
  }

  info(): DiskInfo {
    return { size: this.diskSize, logicalBlockSize: 512, physicalBlockSize: this.header.clusterSize, readOnly: true };
  }

  capabilities(): Capabilities {
    return { write: false, flush: false, fua: false, trim: false, zero: false, extents: true, multiConn: true, concurrent: this.concurrent };
  }

  read(buf: Uint8Array, offset: number): Promise<void> {
    try {
      // Most small reads lie in one stretch whose L2 table is cached: straight to its reader.
      const run = this.map.runLoaded(offset, buf.length);
      if (run && run.length === buf.length) return this.readRun(run, buf);
    } catch (e) {
      return Promise.reject(e);
    }
    return this.readRuns(buf, offset);
  }

  /** A read of several stretches: neighbours in the image file are fetched together (readSpan). */
  private async readRuns(buf: Uint8Array, offset: number): Promise<void> {
    const tasks: Array<() => Promise<void>> = [];
    let span: Span | undefined;
    const flush = () => {
      if (!span) return;
      const done = span;
      tasks.push(done.pieces.length === 1 ? () => this.readRun(done.pieces[0].run, done.pieces[0].slice) : () => this.readSpan(done));
      span = undefined;
    };
    for (let pos = 0; pos < buf.length; ) {
      const run = await this.map.run(offset + pos, buf.length - pos);
      const piece = { run, slice: buf.subarray(pos, pos + run.length) };
      pos += run.length;
      const range = this.hostRange(piece);
      if (!range) {
        tasks.push(() => this.readRun(run, piece.slice));
        continue;
      }
      const [start, end] = range;
      if (span && start >= span.start && start <= span.end + COALESCE_GAP && Math.max(span.end, end) - span.start <= COALESCE_MAX) {
        span.pieces.push(piece);
        span.end = Math.max(span.end, end);
      } else {
        flush();
        span = { start, end, pieces: [piece] };
      }
    }
    flush();
    if (this.concurrent) await Promise.all(tasks.map((task) => task()));
    else for (const task of tasks) await task();
  }

  /** Where a piece's bytes lie in the image file, when they can share a read with its neighbours. */
  private hostRange({ run, slice }: Piece): [number, number] | undefined {
    if (run.kind === 'compressed') return [run.compressed!.offset, run.compressed!.offset + run.compressed!.length];
    // Data past the end is left to readData, which names the damage.
    if (run.kind === 'data' && !this.dataFile && run.host! + slice.length <= this.imageSize) return [run.host!, run.host! + slice.length];
    return undefined;
  }

  /** Reads neighbouring clusters with one read of the image file, then places each piece. */
  private async readSpan(span: Span): Promise<void> {
    const scratch = this.spares.pop() ?? new Uint8Array(COALESCE_MAX);
    try {
      const bytes = scratch.subarray(0, span.end - span.start);
      await this.lower.read(bytes, span.start);
      for (const { run, slice } of span.pieces) {
        if (run.kind === 'data') {
          slice.set(bytes.subarray(run.host! - span.start, run.host! - span.start + slice.length));
        } else {
          const extent = run.compressed!;
          const input = bytes.subarray(extent.offset - span.start, extent.offset - span.start + extent.length);
          this.placeCompressed(run, slice, input);
        }
      }
    } finally {
      if (this.spares.length < SPARE_SPANS) this.spares.push(scratch);
    }
  }

  /** Fills `slice` with the bytes of `run`. May throw before it returns a promise. */
  private readRun(run: Run, slice: Uint8Array): Promise<void> {
    switch (run.kind) {
      case 'zero':
        slice.fill(0);
        return DONE;
      case 'unallocated':
        return this.readBacking(slice, run.guest);
      case 'data':
        return this.readData(slice, run.host!, run.guest);
      case 'compressed': {
        const extent = run.compressed!;
        const cached = slice.length < this.header.clusterSize ? this.decompressed.get(extent.offset) : undefined;
        if (!cached) return this.readCompressed(run, slice);
        const start = run.guest - extent.clusterGuest;
        slice.set(cached.subarray(start, start + slice.length));
        return DONE;
      }
    }
  }

  /** A compressed run whose cluster is not in the cache: its bytes are read into a reused buffer. */
  private async readCompressed(run: Run, slice: Uint8Array): Promise<void> {
    const extent = run.compressed!;
    const input = this.inputs.take(extent.length);
    try {
      await this.lower.read(input, extent.offset);
      this.placeCompressed(run, slice, input);
    } finally {
      this.inputs.give(input);
    }
  }

  /**
   * Puts a compressed run's bytes in place, decoded from the descriptor's bytes `input`.
   * A read of a whole cluster (a sequential reader) is decoded straight into the caller's
   * buffer; parts of clusters go through the cache of decoded clusters, so small reads
   * within one cluster decode it once. Synchronous: see ClusterCache.
   */
  private placeCompressed(run: Run, slice: Uint8Array, input: Uint8Array): void {
    const extent = run.compressed!;
    if (slice.length === this.header.clusterSize) {
      this.decompress(extent, input, slice);
      return;
    }
    const cluster = this.decompressed.fill(extent.offset, (into) => this.decompress(extent, input, into));
    const start = run.guest - extent.clusterGuest;
    slice.set(cluster.subarray(start, start + slice.length));
  }

  /** Data clusters: in the image file, or in the external data file. Never past its end. */
  private readData(slice: Uint8Array, host: number, guest: number): Promise<void> {
    const store = this.dataFile ?? this.lower;
    const storeSize = store.info().size;
    if (host + slice.length > storeSize) {
      throw new CorruptImageError(
        'l2_entry',
        `qcow2: ${this.where}: guest offset ${guest} maps to ${host} (${slice.length} bytes), past the end of the ${storeSize}-byte ${this.dataFile ? 'data file' : 'file'}`,
        'EIO',
      );
    }
    return store.read(slice, host);
  }

  /** Unallocated: the backing file's bytes, zeros past its end or without one. */
  private async readBacking(slice: Uint8Array, guest: number): Promise<void> {
    const backingSize = this.backing ? this.backing.info().size : 0;
    const present = Math.max(0, Math.min(slice.length, backingSize - guest));
    if (present > 0) await this.backing!.read(slice.subarray(0, present), guest);
    if (present < slice.length) slice.fill(0, present);
  }

  private decompress(extent: NonNullable<Run['compressed']>, input: Uint8Array, out?: Uint8Array): Uint8Array {
    try {
      return decompressCluster(this.header.compressionType, input, this.header.clusterSize, out);
    } catch (e) {
      if (!(e instanceof DecompressError)) throw e;
      throw new CorruptImageError('compressed_cluster', `qcow2: ${this.where}: compressed cluster at guest offset ${extent.clusterGuest} (data at ${extent.offset}): ${e.message}`, 'EIO');
    }
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    const end = offset + length;
    const out: Extent[] = [];
    const push = (extent: Extent) => {
      const last = out[out.length - 1];
      if (last && last.type === extent.type && last.offset + last.length === extent.offset) last.length += extent.length;
      else out.push({ ...extent });
    };
    const firstTable = Math.floor(offset / this.map.l2Span);
    for (let pos = offset; pos < end; ) {
      if (Math.floor(pos / this.map.l2Span) - firstTable >= EXTENTS_TABLES_PER_CALL) break;
      const run = await this.map.run(pos, end - pos);
      if (run.kind === 'unallocated') {
        const covered = await this.backingExtents(run.guest, run.length, push);
        pos += covered;
        if (covered < run.length) break; // the backing file stopped early: so do we
      } else {
        push({ offset: run.guest, length: run.length, type: run.kind === 'zero' ? 'zero' : 'data' });
        pos += run.length;
      }
    }
    return out;
  }

  /** Extents of an unallocated stretch: the backing file's, holes past its end. Returns bytes covered. */
  private async backingExtents(guest: number, length: number, push: (e: Extent) => void): Promise<number> {
    const backingSize = this.backing ? this.backing.info().size : 0;
    const present = Math.max(0, Math.min(length, backingSize - guest));
    if (present === 0) {
      push({ offset: guest, length, type: 'hole' });
      return length;
    }
    const backing = this.backing!;
    let covered = 0;
    if (backing.extents && backing.capabilities().extents) {
      for (const e of await backing.extents(guest, present)) {
        const start = Math.max(e.offset, guest);
        const stop = Math.min(e.offset + e.length, guest + present);
        if (stop <= start) continue;
        push({ offset: start, length: stop - start, type: e.type });
        covered = stop - guest;
      }
      if (covered < present) return covered;
    } else {
      push({ offset: guest, length: present, type: 'data' });
      covered = present;
    }
    if (present < length) push({ offset: guest + present, length: length - present, type: 'hole' });
    return length;
  }

  describe(): Record<string, unknown> {
    const h = this.header;
    const incompatible: string[] = [];
    if (hasBit(h.incompatibleFeatures, INCOMPAT.dirty)) incompatible.push('dirty');
    if (hasBit(h.incompatibleFeatures, INCOMPAT.externalDataFile)) incompatible.push('external data file');
    if (hasBit(h.incompatibleFeatures, INCOMPAT.compressionType)) incompatible.push('compression type');
    if (hasBit(h.incompatibleFeatures, INCOMPAT.extendedL2)) incompatible.push('extended L2');
    const compatible: string[] = [];
    if (hasBit(h.compatibleFeatures, COMPAT_LAZY_REFCOUNTS)) compatible.push('lazy refcounts');
    const autoclear: string[] = [];
    if (hasBit(h.autoclearFeatures, AUTOCLEAR.bitmaps)) autoclear.push('bitmaps');
    if (hasBit(h.autoclearFeatures, AUTOCLEAR.rawExternalData)) autoclear.push('raw external data');
    const dirty = hasBit(h.incompatibleFeatures, INCOMPAT.dirty);
    const details: Record<string, unknown> = {
      version: h.version,
      clusterSize: h.clusterSize,
      compression: h.compressionType,
      refcountBits: 2 ** h.refcountOrder,
      features: [...incompatible, ...compatible, ...autoclear].join(', ') || 'none',
      dirty: dirty ? (hasBit(h.compatibleFeatures, COMPAT_LAZY_REFCOUNTS) ? 'yes (lazy refcounts not flushed; data is sound, read-only)' : 'yes') : 'no',
    };
    if (h.backingFile !== undefined) details.backing = h.backingFile;
    if (h.extensions.backingFormat !== undefined) details.backingFormat = h.extensions.backingFormat;
    if (h.extensions.dataFile !== undefined) details.dataFile = h.extensions.dataFile;
    if (h.extensions.bitmaps) details.bitmaps = h.extensions.bitmaps;
    if (this.snapshots.length) {
      details.snapshots = this.snapshots.map((s) => ({ id: s.id, name: s.name, size: s.diskSize ?? h.size, date: new Date(s.date * 1000).toISOString() }));
    }
    if (this.openedSnapshot) details.snapshot = this.openedSnapshot.name;
    return details;
  }

  /**
   * What the caches hold now against their bounds, in bytes (for tests and statistics).
   * The L2 cache holds at least one table whatever l2-cache-size says.
   */
  cacheUse(): { l2Bytes: number; l2LimitBytes: number; decodedBytes: number; decodedLimitBytes: number; spareInputBytes: number; spareInputLimitBytes: number } {
    const l2 = this.map.l2CacheUse();
    const clusterSize = this.header.clusterSize;
    return {
      l2Bytes: l2.tables * clusterSize,
      l2LimitBytes: l2.capacity * clusterSize,
      decodedBytes: this.decompressed.size * clusterSize,
      decodedLimitBytes: this.decompressed.capacity * clusterSize,
      spareInputBytes: this.inputs.held * this.inputs.size,
      spareInputLimitBytes: this.inputs.keep * this.inputs.size,
    };
  }

  async allocatedBytes(): Promise<number | undefined> {
    return this.lower.allocatedBytes ? this.lower.allocatedBytes() : undefined;
  }

  async close(): Promise<void> {
    this.map?.clearCaches();
    this.decompressed?.clear();
    this.inputs?.clear();
    this.spares.length = 0;
    await this.closeOpened();
    await this.lower.close();
  }

  private async closeOpened(): Promise<void> {
    const opened = [this.backing, this.dataFile];
    this.backing = undefined;
    this.dataFile = undefined;
    for (const p of opened) await p?.close().catch(() => {});
  }

  /** Reads `length` bytes of the image file; a short file is an error, never zeros. */
  private async readImage(offset: number, length: number): Promise<Uint8Array> {
    if (offset + length > this.imageSize) {
      throw new CorruptImageError('file_size', `qcow2: ${this.where}: metadata at ${offset} (${length} bytes) lies past the end of the ${this.imageSize}-byte file`, 'EIO');
    }
    const buf = new Uint8Array(length);
    await this.lower.read(buf, offset);
    return buf;
  }
}
