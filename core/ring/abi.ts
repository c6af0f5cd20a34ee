/**
 * The bytes of Xen's `io/blkif.h` for the two x86 guest ABIs, as plain data.
 *
 * A request slot is parsed from a private copy (the caller copies the slot out of shared
 * memory once; nothing here reads shared memory) into a `BlkifRequest`, or into a
 * `Malformed` that still carries the id and operation the response must echo.
 * Offsets were checked by compiling against the real headers (see
 * /work/shared/reference/xen-blkif.md §1.3).
 */

export const SECTOR = 512;
export const PAGE = 4096;
export const SECTORS_PER_PAGE = PAGE / SECTOR;

export const OP_READ = 0;
export const OP_WRITE = 1;
export const OP_WRITE_BARRIER = 2;
export const OP_FLUSH_DISKCACHE = 3;
export const OP_DISCARD = 5;
export const OP_INDIRECT = 6;

export const MAX_SEGMENTS_PER_REQUEST = 11;
export const MAX_INDIRECT_PAGES = 8;
export const SEGMENT_SIZE = 8;
export const SEGMENTS_PER_INDIRECT_PAGE = PAGE / SEGMENT_SIZE;
export const DISCARD_SECURE = 0x01;

export const RSP_OKAY = 0;
export const RSP_ERROR = -1;
export const RSP_EOPNOTSUPP = -2;

export const VDISK_CDROM = 0x1;
export const VDISK_REMOVABLE = 0x2;
export const VDISK_READONLY = 0x4;

export type Protocol = 'x86_64-abi' | 'x86_32-abi';

/** Where the fields of each structure sit for one ABI. */
export interface Layout {
  readonly protocol: Protocol;
  /** A ring slot: the union of request and response (the r/w request is the largest). */
  readonly slotSize: number;
  readonly responseSize: number;
  readonly id: number;
  readonly sectorNumber: number;
  /** r/w: the segment array; discard: nr_sectors. */
  readonly segments: number;
  readonly nrSectors: number;
  readonly indirectHandle: number;
  readonly indirectGrefs: number;
}

export const LAYOUTS: Record<Protocol, Layout> = {
  'x86_64-abi': {
    protocol: 'x86_64-abi',
    slotSize: 112,
    responseSize: 16,
    id: 8,
    sectorNumber: 16,
    segments: 24,
    nrSectors: 24,
    indirectHandle: 24,
    indirectGrefs: 28,
  },
  'x86_32-abi': {
    protocol: 'x86_32-abi',
    slotSize: 108,
    responseSize: 12,
    id: 4,
    sectorNumber: 12,
    segments: 20,
    nrSectors: 20,
    indirectHandle: 20,
    indirectGrefs: 24,
  },
};

export function layoutFor(protocol: string | undefined): Layout | undefined {
  if (protocol === undefined || protocol === '') return LAYOUTS['x86_64-abi'];
  return (LAYOUTS as Record<string, Layout>)[protocol];
}

/** One segment: a granted page and the sectors of it the request uses (inclusive). */
export interface Segment {
  gref: number;
  firstSect: number;
  lastSect: number;
}

export type BlkifRequest =
  | { kind: 'rw'; operation: number; id: bigint; handle: number; sector: bigint; segments: Segment[] }
  | { kind: 'discard'; operation: number; id: bigint; handle: number; sector: bigint; nrSectors: bigint; secure: boolean }
  | { kind: 'indirect'; operation: number; innerOp: number; id: bigint; handle: number; sector: bigint; nrSegments: number; indirectGrefs: number[] }
  | { kind: 'unknown'; operation: number; id: bigint }
  | Malformed;

/** A request that cannot be served; `status` says how to answer it. */
export interface Malformed {
  kind: 'malformed';
  operation: number;
  id: bigint;
  status: number;
  reason: string;
}

function malformed(operation: number, id: bigint, reason: string): Malformed {
  return { kind: 'malformed', operation, id, status: RSP_ERROR, reason };
}

let lastView: DataView | undefined;
/** A DataView over `bytes`, kept while the same bytes come back (the ring's reused slot copy). */
function viewOf(bytes: Uint8Array): DataView {
  if (lastView?.buffer === bytes.buffer && lastView.byteOffset === bytes.byteOffset && lastView.byteLength === bytes.length) return lastView;
  return (lastView = new DataView(bytes.buffer, bytes.byteOffset, bytes.length));
}

/** Reads one segment descriptor (same layout in both ABIs) and checks it. */
export function parseSegment(bytes: Uint8Array, at: number): Segment | string {
  // Plain byte loads (a DataView per segment costs more than the segment's parse).
  const gref = (bytes[at] | (bytes[at + 1] << 8) | (bytes[at + 2] << 16) | (bytes[at + 3] << 24)) >>> 0;
  const seg = { gref, firstSect: bytes[at + 4], lastSect: bytes[at + 5] };
  if (seg.lastSect >= SECTORS_PER_PAGE) return `segment last_sect ${seg.lastSect} is past the page`;
  if (seg.firstSect > seg.lastSect) return `segment first_sect ${seg.firstSect} is after last_sect ${seg.lastSect}`;
  return seg;
}

/**
 * Parses a private copy of one request slot. `maxIndirectSegments` is what the backend
 * advertised (0: no indirect). Range checks against the disk happen later, with the VBD.
 */
export function parseRequest(slot: Uint8Array, layout: Layout, maxIndirectSegments: number): BlkifRequest {
  if (slot.length < layout.slotSize) throw new RangeError(`a ${layout.protocol} slot is ${layout.slotSize} bytes, got ${slot.length}`);
  const view = viewOf(slot);
  const operation = view.getUint8(0);
  const id = view.getBigUint64(layout.id, true);
  const sector = view.getBigUint64(layout.sectorNumber, true);
  switch (operation) {
    case OP_READ:
    case OP_WRITE:
    case OP_WRITE_BARRIER:
    case OP_FLUSH_DISKCACHE: {
      const count = view.getUint8(1);
      const handle = view.getUint16(2, true);
      if (count > MAX_SEGMENTS_PER_REQUEST) return malformed(operation, id, `${count} segments (at most ${MAX_SEGMENTS_PER_REQUEST})`);
      if (count === 0 && (operation === OP_READ || operation === OP_WRITE)) return malformed(operation, id, 'a read or write without segments');
      const segments: Segment[] = [];
      for (let i = 0; i < count; i++) {
        const seg = parseSegment(slot, layout.segments + i * SEGMENT_SIZE);
        if (typeof seg === 'string') return malformed(operation, id, seg);
        segments.push(seg);
      }
      return { kind: 'rw', operation, id, handle, sector, segments };
    }
    case OP_DISCARD: {
      const flag = view.getUint8(1);
      const handle = view.getUint16(2, true);
      const nrSectors = view.getBigUint64(layout.nrSectors, true);
      return { kind: 'discard', operation, id, handle, sector, nrSectors, secure: (flag & DISCARD_SECURE) !== 0 };
    }
    case OP_INDIRECT: {
      if (maxIndirectSegments === 0) return { kind: 'unknown', operation, id };
      const innerOp = view.getUint8(1);
      const nrSegments = view.getUint16(2, true);
      const handle = view.getUint16(layout.indirectHandle, true);
      // The response carries the inner operation, even when that is what is wrong.
      if (innerOp !== OP_READ && innerOp !== OP_WRITE) return malformed(innerOp, id, `indirect operation ${innerOp} (only read and write)`);
      if (nrSegments === 0 || nrSegments > maxIndirectSegments) return malformed(innerOp, id, `${nrSegments} indirect segments (1..${maxIndirectSegments})`);
      const pages = Math.ceil(nrSegments / SEGMENTS_PER_INDIRECT_PAGE);
      const indirectGrefs: number[] = [];
      for (let i = 0; i < pages; i++) indirectGrefs.push(view.getUint32(layout.indirectGrefs + 4 * i, true));
      return { kind: 'indirect', operation, innerOp, id, handle, sector, nrSegments, indirectGrefs };
    }
    default:
      return { kind: 'unknown', operation, id };
  }
}

/** The response to a request: the operation to echo (the inner one for INDIRECT). */
export function responseOperation(request: BlkifRequest): number {
  return request.kind === 'indirect' ? request.innerOp : request.operation;
}

/**
 * Writes a response into `slot` (the ring slot's bytes): built in a zeroed buffer, so
 * padding is zero, then copied; nothing past the response structure is written.
 */
export function writeResponse(slot: Uint8Array, layout: Layout, id: bigint, operation: number, status: number): void {
  responseScratch.fill(0);
  responseView.setBigUint64(0, id, true);
  responseView.setUint8(8, operation);
  responseView.setInt16(10, status, true);
  slot.set(layout.responseSize === 16 ? responseScratch : responseScratch12);
}
/** The zeroed buffer a response is built in (one for the process: responses are written one at a time). */
const responseScratch = new Uint8Array(16);
const responseScratch12 = responseScratch.subarray(0, 12);
const responseView = new DataView(responseScratch.buffer);

/** Encodes a request (the frontend side; used by tests and the TypeScript frontend). */
export function encodeRequest(slot: Uint8Array, layout: Layout, request: Exclude<BlkifRequest, Malformed | { kind: 'unknown' }>): void {
  const view = new DataView(slot.buffer, slot.byteOffset, layout.slotSize);
  slot.fill(0, 0, layout.slotSize);
  view.setUint8(0, request.operation);
  view.setBigUint64(layout.id, request.id, true);
  view.setBigUint64(layout.sectorNumber, request.sector, true);
  if (request.kind === 'rw') {
    view.setUint8(1, request.segments.length);
    view.setUint16(2, request.handle, true);
    request.segments.forEach((s, i) => encodeSegment(slot, layout.segments + i * SEGMENT_SIZE, s));
  } else if (request.kind === 'discard') {
    view.setUint8(1, request.secure ? DISCARD_SECURE : 0);
    view.setUint16(2, request.handle, true);
    view.setBigUint64(layout.nrSectors, request.nrSectors, true);
  } else {
    view.setUint8(1, request.innerOp);
    view.setUint16(2, request.nrSegments, true);
    view.setUint16(layout.indirectHandle, request.handle, true);
    request.indirectGrefs.forEach((g, i) => view.setUint32(layout.indirectGrefs + 4 * i, g, true));
  }
}

export function encodeSegment(bytes: Uint8Array, at: number, s: Segment): void {
  const view = new DataView(bytes.buffer, bytes.byteOffset + at, SEGMENT_SIZE);
  view.setUint32(0, s.gref, true);
  view.setUint8(4, s.firstSect);
  view.setUint8(5, s.lastSect);
  view.setUint16(6, 0, true);
}

/** Reads a response (the frontend side). */
export function decodeResponse(slot: Uint8Array, layout: Layout): { id: bigint; operation: number; status: number } {
  const view = new DataView(slot.buffer, slot.byteOffset, layout.responseSize);
  return { id: view.getBigUint64(0, true), operation: view.getUint8(8), status: view.getInt16(10, true) };
}
