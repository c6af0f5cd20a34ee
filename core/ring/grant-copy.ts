/**
 * Data by grant copy instead of grant mapping (Linux gntdev's IOCTL_GNTDEV_GRANT_COPY,
 * through libxengnttab): a request's data pages are never mapped into the backend; the
 * bytes are copied between a local bounce buffer and the guest's granted pages.
 *
 *  - WRITE: the segments' bytes are copied in when the pages are asked for, before the
 *    VBD sees anything (a refused grant refuses the request, nothing is written);
 *  - READ: the VBD reads into the bounce buffer; `release(true)` copies the segments'
 *    bytes out to the guest. Only the segments' sectors are copied, never whole pages:
 *    the rest of a guest page is not ours to write. A refused grant there fails the
 *    request (the guest gets BLKIF_RSP_ERROR; segments before it may have been written).
 *
 * The ring pages are still mapped (they are read and written all the time). When the copy
 * call itself fails (not a refused grant: the kernel or library lacks grant copy), the
 * mapper falls back to mapping for the rest of the connection and says so once.
 */
import { PAGE, SECTOR } from './abi';
import { GrantError, type GrantMapper, type PageMapping, type PageSpan, type RingMapping } from './platform';

/** One piece of a copy: `local` to or from bytes `offset..` of the guest's grant `ref`. */
export interface CopyPiece {
  local: Buffer;
  ref: number;
  offset: number;
  /** 'in': guest → local; 'out': local → guest. */
  direction: 'in' | 'out';
}

/** A platform's grant copy: one status per piece (0 done, negative: refused). */
export interface GrantCopier {
  copy(domid: number, pieces: CopyPiece[]): number[];
}

/** At most this much of released bounce buffers is kept for reuse, per connection. */
const SPARE_BYTES = 8 * 1024 * 1024;

/** The copy call failed as a whole (no grant copy here): fall back to mapping. */
export class CopyUnavailable extends Error {}

export class CopyingGrantMapper implements GrantMapper {
  private fallback?: string;

  constructor(
    private readonly mapper: GrantMapper,
    private readonly copier: GrantCopier,
    readonly domid: number,
    private readonly log?: (message: string) => void,
  ) {}

  /** How data moves on this connection (for the connect log). */
  get access(): string {
    return this.fallback ? `grant map (grant copy failed: ${this.fallback})` : 'grant copy';
  }

  mapRing(refs: number[]): RingMapping {
    return this.mapper.mapRing(refs);
  }

  private run(pieces: CopyPiece[]): boolean {
    let statuses: number[];
    try {
      statuses = this.copier.copy(this.domid, pieces);
    } catch (e) {
      if (!(e instanceof CopyUnavailable)) throw e;
      this.fallback = e.message;
      this.log?.(`grant copy unavailable (${e.message}): mapping grants from now on`);
      return false;
    }
    const bad = statuses.findIndex((s) => s !== 0);
    if (bad >= 0) throw new GrantError(`grant ${pieces[bad].ref} of domain ${this.domid} refused by grant copy (status ${statuses[bad]})`);
    return true;
  }

  mapPages(refs: number[], writable: boolean, spans?: PageSpan[]): PageMapping {
    if (this.fallback) return this.mapper.mapPages(refs, writable, spans);
    const bounce = this.takeBounce(refs.length);
    const pages = refs.map((_, i) => bounce.subarray(i * PAGE, (i + 1) * PAGE));
    const pieces = (direction: 'in' | 'out'): CopyPiece[] =>
      refs.map((ref, i) => {
        const span = spans?.[i];
        const offset = span ? span.firstSect * SECTOR : 0;
        const end = span ? (span.lastSect + 1) * SECTOR : PAGE;
        if (offset < 0 || end <= offset || end > PAGE) throw new GrantError(`segment ${i} spans bytes ${offset}..${end}, outside a page`);
        return { local: pages[i].subarray(offset, end), ref, offset, direction };
      });
    if (!writable) {
      let copied = false;
      try {
        copied = this.run(pieces('in'));
      } finally {
        if (!copied) this.giveBounce(bounce);
      }
      if (!copied) return this.mapper.mapPages(refs, writable, spans);
    }
    let released = false;
    return {
      pages,
      release: (completed = true) => {
        if (released) return;
        released = true;
        try {
          if (!writable || !completed) return;
          const out = pieces('out');
          if (this.fallback || !this.run(out)) this.copyOutByMapping(refs, out);
        } finally {
          this.giveBounce(bounce);
        }
      },
    };
  }

  /**
   * Bounce buffers of released requests are kept (up to SPARE_BYTES a connection) and
   * reused by later requests of the same size: a fresh 128 KiB buffer per request kept
   * the garbage collector busy. They only ever hold this connection's guest's data.
   */
  private readonly spare = new Map<number, Buffer[]>();
  private spareBytes = 0;

  private takeBounce(pages: number): Buffer {
    const bounce = this.spare.get(pages)?.pop();
    if (!bounce) return Buffer.allocUnsafe(pages * PAGE);
    this.spareBytes -= bounce.length;
    return bounce;
  }

  private giveBounce(bounce: Buffer): void {
    if (this.spareBytes + bounce.length > SPARE_BYTES) return;
    const pages = bounce.length / PAGE;
    let list = this.spare.get(pages);
    if (!list) this.spare.set(pages, (list = []));
    list.push(bounce);
    this.spareBytes += bounce.length;
  }

  /** READ data already in the bounce buffer, written to the guest through a mapping. */
  private copyOutByMapping(refs: number[], pieces: CopyPiece[]): void {
    const mapping = this.mapper.mapPages(refs, true);
    try {
      pieces.forEach((p, i) => mapping.pages[i].set(p.local, p.offset));
    } finally {
      mapping.release();
    }
  }

  close(): void {
    this.spare.clear();
    this.spareBytes = 0;
    this.mapper.close();
  }
}
