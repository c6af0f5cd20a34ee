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

/**
 * Bounce buffers of released requests, kept (up to `limit` bytes) and handed to later
 * requests of the same size: a fresh 128 KiB buffer per request kept the garbage
 * collector busy. One pool per connection: a buffer only ever holds that guest's data.
 */
export class BouncePool {
  private readonly spare = new Map<number, Buffer[]>();
  private bytes = 0;

  constructor(private readonly limit = 8 * 1024 * 1024) {}

  /** A buffer of `pages` pages (its contents are whatever was there). */
  take(pages: number): Buffer {
    const bounce = this.spare.get(pages)?.pop();
    if (!bounce) return Buffer.allocUnsafe(pages * PAGE);
    this.bytes -= bounce.length;
    return bounce;
  }

  /** Back to the pool: the caller no longer touches it. */
  give(bounce: Buffer): void {
    if (this.bytes + bounce.length > this.limit) return;
    const pages = bounce.length / PAGE;
    let list = this.spare.get(pages);
    if (!list) this.spare.set(pages, (list = []));
    list.push(bounce);
    this.bytes += bounce.length;
  }

  clear(): void {
    this.spare.clear();
    this.bytes = 0;
  }

  /** A buffer of `count` pages from the pool and its pages as views. */
  takePages(count: number): { bounce: Buffer; pages: Buffer[] } {
    const bounce = this.take(count);
    const pages: Buffer[] = [];
    for (let i = 0; i < count; i++) pages.push(bounce.subarray(i * PAGE, (i + 1) * PAGE));
    return { bounce, pages };
  }

  /**
   * The PageMapping a request gets over bounce pages: releasing it the first time runs
   * `copyOut` (a READ's data out to the guest) when the request completed, then gives the
   * buffer back to the pool, whatever copyOut did.
   */
  mapping(bounce: Buffer, pages: Buffer[], copyOut: (() => void) | undefined): PageMapping {
    let released = false;
    return {
      pages,
      release: (completed = true) => {
        if (released) return;
        released = true;
        try {
          if (completed) copyOut?.();
        } finally {
          this.give(bounce);
        }
      },
    };
  }
}

/** Bytes `offset..end` of a page a segment uses (its sectors; the whole page without spans). */
export function spanBytes(spans: PageSpan[] | undefined, i: number): { offset: number; end: number } {
  const span = spans?.[i];
  const offset = span ? span.firstSect * SECTOR : 0;
  const end = span ? (span.lastSect + 1) * SECTOR : PAGE;
  if (offset < 0 || end <= offset || end > PAGE) throw new GrantError(`segment ${i} spans bytes ${offset}..${end}, outside a page`);
  return { offset, end };
}

/** The copy call failed as a whole (no grant copy here): fall back to mapping. */
export class CopyUnavailable extends Error {}

export class CopyingGrantMapper implements GrantMapper {
  private fallback?: string;
  private readonly bounces = new BouncePool();

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
    const { bounce, pages } = this.bounces.takePages(refs.length);
    const pieces = (direction: 'in' | 'out'): CopyPiece[] =>
      refs.map((ref, i) => {
        const { offset, end } = spanBytes(spans, i);
        return { local: pages[i].subarray(offset, end), ref, offset, direction };
      });
    if (!writable) {
      let copied = false;
      try {
        copied = this.run(pieces('in'));
      } finally {
        if (!copied) this.bounces.give(bounce);
      }
      if (!copied) return this.mapper.mapPages(refs, writable, spans);
    }
    return this.bounces.mapping(bounce, pages, writable ? () => {
      const out = pieces('out');
      if (this.fallback || !this.run(out)) this.copyOutByMapping(refs, out);
    } : undefined);
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
    this.bounces.clear();
    this.mapper.close();
  }
}
