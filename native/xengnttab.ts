/**
 * libxengnttab (Xen's grant-table library, Debian package libxengnttab1): maps a foreign
 * domain's granted pages into this process, and, on Linux, copies to and from granted
 * pages without mapping them (grant copy). Used by the blkif backend's `xen` platform.
 *
 * Mapped memory is handed out as a Buffer that does not own it: the caller unmaps it and
 * must not touch the Buffer afterwards.
 */
import * as fs from 'node:fs';
import { BlockError } from '../core/errors';
import { NativeError } from './libc';
import { addressOf, ffiModules, lastErrno, lazyLibrary, preparedFunction } from './ffi';

interface Gnttab {
  xengnttab_open(logger: Buffer | null, flags: number): Buffer;
  xengnttab_close(handle: Buffer): number;
  xengnttab_map_domain_grant_refs(handle: Buffer, count: number, domid: number, refs: Buffer, prot: number): Buffer;
  xengnttab_unmap(handle: Buffer, start: Buffer, count: number): number;
  xengnttab_grant_copy(handle: Buffer, count: number, segments: Buffer): number;
}

const gnttab = lazyLibrary<Gnttab>('libxengnttab.so.1', 'the Xen platform (grant tables)', {
  xengnttab_open: ['pointer', ['pointer', 'uint']],
  xengnttab_close: ['int', ['pointer']],
  xengnttab_map_domain_grant_refs: ['pointer', ['pointer', 'uint32', 'uint32', 'pointer', 'int']],
  xengnttab_unmap: ['int', ['pointer', 'pointer', 'uint32']],
  xengnttab_grant_copy: ['int', ['pointer', 'uint32', 'pointer']],
});

/** xengnttab_grant_copy(handle, count, segments), called once per copy (the hot path: prepared, native/ffi.ts). */
const grantCopyCall = preparedFunction('libxengnttab.so.1', 'the Xen platform (grant copy)', 'xengnttab_grant_copy', ['pointer', 'uint32', 'pointer']);

export const XEN_PAGE = 4096;
const PROT_READ = 1;
const PROT_WRITE = 2;
/**
 * xengnttab_grant_copy_segment_t (xengnttab.h): two 8-byte unions `source` and `dest`
 * (a local pointer, or {ref u32, offset u16, domid u16} of a guest's page), then len u16,
 * flags u16, status i16, padded to 24. Checked against the header by a C program in
 * test/xen-grant-copy.test.ts.
 */
export const GRANT_COPY_SEGMENT_SIZE = 24;
export const COPY_LAYOUT = { source: 0, dest: 8, foreignRef: 0, foreignOffset: 4, foreignDomid: 6, len: 16, flags: 18, status: 20 } as const;
export const GNTCOPY_source_gref = 1;
export const GNTCOPY_dest_gref = 2;

/**
 * The segment table xengnttab_grant_copy takes, written into `table` (from its start; a
 * new one when it is absent or too small: the one written is returned). `addressOf(local)`
 * is where `local`'s bytes are (native/ffi.ts's addressOf; a test passes its own).
 */
export function encodeCopySegments(domid: number, segments: CopySegment[], addressOf: (local: Buffer) => number, table?: Buffer): Buffer {
  const L = COPY_LAYOUT;
  const bytes = GRANT_COPY_SEGMENT_SIZE * segments.length;
  if (!table || table.length < bytes) table = Buffer.alloc(bytes);
  for (let i = 0; i < segments.length; i++) {
    const s = segments[i];
    if (s.local.length === 0 || s.offset + s.local.length > XEN_PAGE) throw new BlockError('EINVAL', `grant copy segment ${i} is empty or crosses a page`);
    const at = i * GRANT_COPY_SEGMENT_SIZE;
    const foreignAt = at + (s.direction === 'in' ? L.source : L.dest);
    const localAt = at + (s.direction === 'in' ? L.dest : L.source);
    table.writeUInt32LE(s.ref >>> 0, foreignAt + L.foreignRef);
    table.writeUInt16LE(s.offset, foreignAt + L.foreignOffset);
    table.writeUInt16LE(domid, foreignAt + L.foreignDomid);
    // The other union member: a 64-bit pointer, little-endian (x86-64, arm64).
    const address = addressOf(s.local);
    table.writeUInt32LE(address % 0x1_0000_0000, localAt);
    table.writeUInt32LE(Math.floor(address / 0x1_0000_0000), localAt + 4);
    table.writeUInt16LE(s.local.length, at + L.len);
    table.writeUInt16LE(s.direction === 'in' ? GNTCOPY_source_gref : GNTCOPY_dest_gref, at + L.flags);
    table.writeInt16LE(0, at + L.status);
    table.writeUInt16LE(0, at + L.status + 2);
  }
  return table;
}
/** GNTST_okay; other statuses are negative (GNTST_bad_gntref -4, ...). */
const GNTST_okay = 0;

/** Fails clearly where there is no Xen: no /dev/xen/gntdev, no dom0. */
export function requireGntdev(): void {
  if (process.platform !== 'linux') throw new BlockError('ENOSYS', `the Xen platform's grant mapping is only bound for Linux dom0 here (this is ${process.platform})`);
  if (!fs.existsSync('/dev/xen/gntdev')) throw new BlockError('ENODEV', '/dev/xen/gntdev is absent: not a Xen dom0, or the xen-gntdev module is not loaded');
}

/** One granted region mapped into this process. */
export interface GrantMapping {
  readonly bytes: Buffer;
  unmap(): void;
}

/** One segment of a grant copy: `bytes` of local memory to or from (ref, offset) of `domid`. */
export interface CopySegment {
  local: Buffer;
  ref: number;
  offset: number;
  /** 'in': from the guest's page to `local`; 'out': from `local` to the guest's page. */
  direction: 'in' | 'out';
}

export class GntTab {
  private handle?: Buffer;
  private copyTable?: Buffer;

  constructor() {
    requireGntdev();
    const { ref } = ffiModules('the Xen platform');
    const h = gnttab().xengnttab_open(null, 0);
    if (ref.isNull(h)) throw new NativeError('xengnttab_open', lastErrno());
    this.handle = h;
  }

  private get h(): Buffer {
    if (!this.handle) throw new BlockError('EBADF', 'grant table handle is closed');
    return this.handle;
  }

  /** Maps `refs` of domain `domid` as one virtually contiguous region of refs.length pages. */
  map(domid: number, refs: number[], writable: boolean): GrantMapping {
    const { ref } = ffiModules('the Xen platform');
    const array = Buffer.alloc(4 * refs.length);
    refs.forEach((r, i) => array.writeUInt32LE(r >>> 0, 4 * i));
    const prot = PROT_READ | (writable ? PROT_WRITE : 0);
    const base = gnttab().xengnttab_map_domain_grant_refs(this.h, refs.length, domid, array, prot);
    if (ref.isNull(base)) throw new NativeError(`xengnttab_map_domain_grant_refs (domain ${domid}, refs ${refs.join(',')})`, lastErrno());
    const length = refs.length * XEN_PAGE;
    const bytes = ref.reinterpret(base, length, 0);
    const handle = this.h;
    let mapped = true;
    return {
      bytes,
      unmap() {
        if (!mapped) return;
        mapped = false;
        if (gnttab().xengnttab_unmap(handle, base, refs.length) !== 0) throw new NativeError('xengnttab_unmap', lastErrno());
      },
    };
  }

  /**
   * Copies between local buffers and granted pages in one call (Linux's gntdev grant
   * copy). Returns the per-segment status: 0 for done, a negative GNTST_* otherwise.
   * A segment may not cross a page: offset + local.length <= 4096. Throws a NativeError
   * when the call itself fails (ENOSYS where libxengnttab has no grant copy: NetBSD,
   * FreeBSD; ENOTTY on a kernel without the ioctl).
   */
  copy(domid: number, segments: CopySegment[]): number[] {
    // One table for every copy, grown when needed (the caller is the event loop: never two at once).
    const table = (this.copyTable = encodeCopySegments(domid, segments, addressOf, this.copyTable));
    const call = grantCopyCall();
    call.pointer(0, this.h);
    call.integer(1, segments.length);
    call.pointer(2, table);
    if (call.call() !== 0) throw new NativeError('xengnttab_grant_copy', lastErrno());
    const statuses = new Array<number>(segments.length);
    for (let i = 0; i < segments.length; i++) statuses[i] = table.readInt16LE(i * GRANT_COPY_SEGMENT_SIZE + COPY_LAYOUT.status);
    return statuses;
  }

  /** Whether grant copy works here: a copy of no segments reaches the ioctl and checks nothing. */
  probeCopy(): { ok: true } | { ok: false; reason: string } {
    try {
      if (gnttab().xengnttab_grant_copy(this.h, 0, Buffer.alloc(GRANT_COPY_SEGMENT_SIZE)) !== 0) throw new NativeError('xengnttab_grant_copy', lastErrno());
      return { ok: true };
    } catch (e) {
      return { ok: false, reason: (e as Error).message };
    }
  }

  close(): void {
    if (!this.handle) return;
    gnttab().xengnttab_close(this.handle);
    this.handle = undefined;
  }
}

export { GNTST_okay };
