/**
 * Persistent grants kept mapped. With feature-persistent a frontend grants a fixed pool
 * of its pages once and reuses them for every request until it disconnects (Linux's
 * blkfront copies each request's data into and out of that pool), so the backend may map
 * each grant the first time a request uses it and keep it mapped for the connection, as
 * blkback does. After the pool is mapped a request costs no system call for its data:
 * a WRITE's bytes are copied from the mapped pages into a bounce buffer, a READ's out of
 * the bounce buffer into them (memcpy; only each segment's sectors). The VBD still sees one
 * contiguous buffer per request, so a request stays one read or write.
 *
 * A request whose grants cannot all be kept mapped (the connection already holds `limit`
 * pages, or the hypervisor refuses the mapping, e.g. a read-only grant) goes the
 * per-request way for that request (`perRequest`: grant copy or a mapping per request).
 */
import { BouncePool, spanBytes } from './grant-copy';
import { GrantError, type GrantMapper, type PageMapping, type PageSpan, type RingMapping } from './platform';

/** Pages a connection keeps mapped at most (blkfront's pool for one ring of 32 requests × 33 pages is 1056). */
export const PERSISTENT_LIMIT = 4096;

export class PersistentGrantMapper implements GrantMapper {
  /** Each kept grant's mapped page. */
  private readonly kept = new Map<number, Uint8Array>();
  /** The mappings the kept pages belong to (released at close). */
  private readonly mappings: PageMapping[] = [];
  private readonly bounces = new BouncePool();
  private closed = false;

  /**
   * `mapper` maps new grants (writable, released only at close); `perRequest` serves what
   * cannot be kept. Both may be the same connection's objects: close() closes `perRequest` last.
   */
  constructor(
    private readonly mapper: GrantMapper,
    private readonly perRequest: GrantMapper,
    private readonly limit = PERSISTENT_LIMIT,
  ) {}

  get access(): string {
    return `persistent grants kept mapped (else ${this.perRequest.access ?? 'grant map'})`;
  }

  /** How many grants are kept mapped now. */
  get keptPages(): number {
    return this.kept.size;
  }

  mapRing(refs: number[]): RingMapping {
    return this.perRequest.mapRing(refs);
  }

  mapPages(refs: number[], writable: boolean, spans?: PageSpan[]): PageMapping {
    const guest = this.keptPagesFor(refs);
    if (!guest) return this.perRequest.mapPages(refs, writable, spans);
    const spansBytes = refs.map((_, i) => spanBytes(spans, i));
    const { bounce, pages } = this.bounces.takePages(refs.length);
    if (!writable) {
      // A WRITE (or indirect descriptors): the guest's bytes in before the VBD sees anything.
      spansBytes.forEach(({ offset, end }, i) => pages[i].set(guest[i].subarray(offset, end), offset));
    }
    // A READ that completed: its sectors out to the guest's pages, nothing else of them.
    return this.bounces.mapping(bounce, pages, writable ? () => {
      if (!this.closed) spansBytes.forEach(({ offset, end }, i) => guest[i].set(pages[i].subarray(offset, end), offset));
    } : undefined);
  }

  /** The kept pages of `refs`, mapping the ones not kept yet (all or nothing); undefined when they cannot all be kept. */
  private keptPagesFor(refs: number[]): Uint8Array[] | undefined {
    if (this.closed) throw new GrantError('connection closed');
    const missing = [...new Set(refs.filter((r) => !this.kept.has(r)))];
    if (missing.length > 0) {
      if (this.kept.size + missing.length > this.limit) return undefined;
      let mapping: PageMapping;
      try {
        mapping = this.mapper.mapPages(missing, true);
      } catch (e) {
        if (e instanceof GrantError) return undefined;
        throw e;
      }
      this.mappings.push(mapping);
      missing.forEach((r, i) => this.kept.set(r, mapping.pages[i]));
    }
    return refs.map((r) => this.kept.get(r)!);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const m of this.mappings) m.release();
    this.mappings.length = 0;
    this.kept.clear();
    this.bounces.clear();
    this.perRequest.close();
    if (this.mapper !== this.perRequest) this.mapper.close();
  }
}
