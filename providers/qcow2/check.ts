/**
 * qcow2 without opening it: the files an image names (`references`, for `tapkit info
 * --inspect`) and structural checks (`check`, for `tapkit check`). The checks need no
 * refcounts: every table lies inside the file and is cluster aligned, reserved bits are
 * clear, L2 entries point inside the file, and no two metadata structures (header,
 * L1 tables, refcount table and blocks, snapshot table, L2 tables) overlap each other
 * or a data cluster. Problems are listed, not thrown; at most MAX_PROBLEMS of them.
 */
import type { ImageReference, StructureProblem } from '../../core/inspect';
import { isBlockError } from '../../core/errors';
import type { Limits } from '../../core/limits';
import type { Provider } from '../../core/provider';
import { hasBit, INCOMPAT, MAX_CLUSTER_BITS, parseHeader, type Qcow2Header } from './header';
import { readSnapshotTable } from './snapshots';

const MAX_PROBLEMS = 200;
/** Bits 9..55 of an L1, L2 or refcount table entry: a host offset. */
const OFFSET_MASK = 0x00fffffffffffe00n;

/** Names qemu writes in the backing-format extension → provider names (as the provider maps them). */
export const BACKING_FORMAT_NAMES: Record<string, string> = { raw: 'raw', file: 'raw', qcow2: 'qcow2', vpc: 'vhd', vhd: 'vhd' };

async function readAt(image: Provider, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  await image.read(buf, offset);
  return buf;
}

async function readHeader(image: Provider, limits: Limits): Promise<Qcow2Header> {
  const size = image.info().size;
  const first = await readAt(image, 0, Math.min(size, 2 ** MAX_CLUSTER_BITS));
  return parseHeader(first, size, limits);
}

/** The backing file and the external data file the header names. */
export async function qcow2References(image: Provider, limits: Limits): Promise<ImageReference[]> {
  const header = await readHeader(image, limits);
  const out: ImageReference[] = [];
  if (header.backingFile !== undefined) {
    const named = header.extensions.backingFormat;
    const format = named === undefined ? undefined : Object.hasOwn(BACKING_FORMAT_NAMES, named) ? BACKING_FORMAT_NAMES[named] : named;
    out.push({ role: 'backing', name: header.backingFile, ...(format ? { format } : {}) });
  }
  if (hasBit(header.incompatibleFeatures, INCOMPAT.externalDataFile) && header.extensions.dataFile !== undefined) {
    out.push({ role: 'data-file', name: header.extensions.dataFile, format: 'raw' });
  }
  return out;
}

interface Range {
  start: number;
  end: number;
  what: string;
}

export async function checkQcow2(image: Provider, limits: Limits): Promise<StructureProblem[]> {
  const problems: StructureProblem[] = [];
  let truncated = false;
  const problem = (field: string, message: string) => {
    if (problems.length < MAX_PROBLEMS) problems.push({ field, message });
    else truncated = true;
  };
  let header: Qcow2Header;
  try {
    header = await readHeader(image, limits);
  } catch (e) {
    if (!isBlockError(e)) throw e;
    return [{ field: (e as { field?: string }).field ?? 'header', message: e.message }];
  }
  const fileSize = image.info().size;
  const cluster = header.clusterSize;
  const externalData = hasBit(header.incompatibleFeatures, INCOMPAT.externalDataFile);
  const extendedL2 = hasBit(header.incompatibleFeatures, INCOMPAT.extendedL2);
  const entryBytes = extendedL2 ? 16 : 8;
  const roundUp = (n: number) => Math.ceil(n / cluster) * cluster;
  const metadata: Range[] = [{ start: 0, end: cluster, what: 'the header cluster' }];
  const inFile = (field: string, offset: number, bytes: number, what: string): boolean => {
    if (offset % cluster !== 0) {
      problem(field, `${what} at ${offset} is not aligned to the ${cluster}-byte cluster`);
      return false;
    }
    if (offset + bytes > fileSize) {
      problem(field, `${what} at ${offset} (${bytes} bytes) lies past the end of the ${fileSize}-byte file`);
      return false;
    }
    return true;
  };

  // Refcount table and the refcount blocks it points to (their contents are not judged).
  const refTableBytes = header.refcountTableClusters * cluster;
  metadata.push({ start: header.refcountTableOffset, end: header.refcountTableOffset + refTableBytes, what: 'the refcount table' });
  const refTable = await readAt(image, header.refcountTableOffset, refTableBytes);
  const refView = new DataView(refTable.buffer);
  for (let i = 0; i < refTableBytes / 8; i++) {
    const entry = refView.getBigUint64(i * 8);
    if (entry === 0n) continue;
    if (entry & ~OFFSET_MASK) problem(`refcount_table[${i}]`, `refcount table entry ${i} has reserved bits set (0x${entry.toString(16)})`);
    const offset = Number(entry & OFFSET_MASK);
    if (inFile(`refcount_table[${i}]`, offset, cluster, `refcount block ${i}`)) metadata.push({ start: offset, end: offset + cluster, what: `refcount block ${i}` });
  }

  // L1 tables: the active one and each snapshot's.
  const l1Tables: Array<{ offset: number; size: number; what: string }> = [{ offset: header.l1TableOffset, size: header.l1Size, what: 'the L1 table' }];
  if (header.nbSnapshots > 0) {
    try {
      const snapshots = await readSnapshotTable((o, n) => readAt(image, o, n), header.snapshotsOffset, header.nbSnapshots, fileSize, limits);
      metadata.push({ start: header.snapshotsOffset, end: header.snapshotsOffset + (await snapshotTableBytes(image, header)), what: 'the snapshot table' });
      snapshots.forEach((s, i) => l1Tables.push({ offset: s.l1TableOffset, size: s.l1Size, what: `the L1 table of snapshot ${i} ('${s.name}')` }));
    } catch (e) {
      if (!isBlockError(e)) throw e;
      problem('snapshots_offset', e.message);
    }
  }

  const l2Tables = new Map<number, string>();
  for (const l1 of l1Tables) {
    if (l1.size === 0) continue;
    if (!inFile('l1_table_offset', l1.offset, l1.size * 8, l1.what)) continue;
    metadata.push({ start: l1.offset, end: roundUp(l1.offset + l1.size * 8), what: l1.what });
    const table = new DataView((await readAt(image, l1.offset, l1.size * 8)).buffer);
    for (let i = 0; i < l1.size; i++) {
      const entry = table.getBigUint64(i * 8);
      if (entry === 0n) continue;
      if (entry & 0x7f000000000001ffn) problem(`l1_table[${i}]`, `${l1.what}: entry ${i} has reserved bits set (0x${entry.toString(16)})`);
      const offset = Number(entry & OFFSET_MASK);
      if (offset === 0) continue;
      if (!inFile(`l1_table[${i}]`, offset, cluster, `${l1.what}: the L2 table of entry ${i}`)) continue;
      if (!l2Tables.has(offset)) l2Tables.set(offset, `the L2 table at ${offset} (${l1.what} entry ${i})`);
    }
  }
  for (const [offset, what] of l2Tables) metadata.push({ start: offset, end: offset + cluster, what });

  // Metadata structures must not overlap one another.
  const sorted = metadata.filter((r) => r.end > r.start).sort((a, b) => a.start - b.start);
  // reach[k]: of sorted[0..k], the range that ends last.
  const reach: Range[] = [];
  for (let i = 0; i < sorted.length; i++) {
    const before = reach[i - 1];
    if (before && before.end > sorted[i].start) problem('overlap', `${sorted[i].what} (${sorted[i].start}..${sorted[i].end}) overlaps ${before.what} (${before.start}..${before.end})`);
    reach.push(before && before.end >= sorted[i].end ? before : sorted[i]);
  }
  const hitsMetadata = (start: number, end: number): Range | undefined => {
    let lo = 0;
    let hi = sorted.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (sorted[mid].start < end) lo = mid + 1;
      else hi = mid;
    }
    // Of the ranges starting before `end`, the one reaching furthest decides.
    return lo > 0 && reach[lo - 1].end > start ? reach[lo - 1] : undefined;
  };

  // L2 entries: data clusters and compressed extents inside the file, clear of metadata.
  const offsetBits = BigInt(62 - (header.clusterBits - 8));
  for (const [offset, what] of l2Tables) {
    const table = new DataView((await readAt(image, offset, cluster)).buffer);
    for (let i = 0; i < cluster / entryBytes; i++) {
      const entry = table.getBigUint64(i * entryBytes);
      const field = `l2_table[${offset}][${i}]`;
      if (entry & (1n << 62n)) {
        if (externalData) problem(field, `${what}: entry ${i} is compressed in an image with an external data file`);
        const descriptor = entry & ((1n << 62n) - 1n);
        const start = Number(descriptor & ((1n << offsetBits) - 1n));
        const length = (Number(descriptor >> offsetBits) + 1) * 512 - (start % 512);
        if (start >= fileSize || start + length > Math.ceil(fileSize / 512) * 512) {
          problem(field, `${what}: entry ${i} has compressed data at ${start} (${length} bytes) past the end of the ${fileSize}-byte file`);
          continue;
        }
        const hit = hitsMetadata(start, Math.min(start + length, fileSize));
        if (hit) problem(field, `${what}: entry ${i} has compressed data at ${start} inside ${hit.what}`);
        continue;
      }
      if (entry & 0x3f000000000001fen && !extendedL2) problem(field, `${what}: entry ${i} has reserved bits set (0x${entry.toString(16)})`);
      const host = Number(entry & OFFSET_MASK);
      if (extendedL2) {
        const zero = table.getUint32(i * entryBytes + 8);
        const alloc = table.getUint32(i * entryBytes + 12);
        if (zero & alloc) problem(field, `${what}: entry ${i} marks subclusters both allocated and zero`);
        if (alloc !== 0 && host === 0 && !externalData) problem(field, `${what}: entry ${i} has allocated subclusters but no host cluster`);
      }
      if (host === 0 || externalData) continue;
      if (host % cluster !== 0) {
        problem(field, `${what}: entry ${i} points to ${host}, not aligned to the ${cluster}-byte cluster`);
        continue;
      }
      if (host + cluster > roundUp(fileSize)) {
        problem(field, `${what}: entry ${i} points to ${host}, past the end of the ${fileSize}-byte file`);
        continue;
      }
      const hit = hitsMetadata(host, host + cluster);
      if (hit) problem(field, `${what}: entry ${i} points to a data cluster at ${host} inside ${hit.what}`);
    }
  }
  if (truncated) problems.push({ field: 'problems', message: `more than ${MAX_PROBLEMS} problems; the rest are not listed` });
  return problems;
}

/** Bytes the snapshot table takes (its entries are variable length). */
async function snapshotTableBytes(image: Provider, header: Qcow2Header): Promise<number> {
  let at = header.snapshotsOffset;
  for (let i = 0; i < header.nbSnapshots; i++) {
    const fixed = new DataView((await readAt(image, at, 40)).buffer);
    at += Math.ceil((40 + fixed.getUint32(36) + fixed.getUint16(12) + fixed.getUint16(14)) / 8) * 8;
  }
  return at - header.snapshotsOffset;
}
