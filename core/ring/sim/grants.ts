/**
 * Grant mapping on the `sim` platform (XENSIM.md "D/dom<N>/memory", "grant-table" and
 * settled details 2-5). For one connection the guest's memory file is mapped MAP_SHARED
 * read-write and its grant table read-only, with the sizes they have at connect time.
 * Each use of a reference copies its 8-byte entry out once and checks it: granted
 * (permit_access, not transitive or sub-page) to domain 0, frame inside the memory
 * file, and not read-only when the backend will write. With persistent grants the check
 * result is kept until the connection ends.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { mapPagesContiguous, mapShared, type Mapping } from '../../../native/mman';
import { PAGE } from '../abi';
import type { CopyPiece } from '../grant-copy';
import { GrantError, type GrantMapper, type PageMapping, type RingMapping } from '../platform';

const GTF_TYPE_MASK = 3;
const GTF_PERMIT_ACCESS = 1;
const GTF_READONLY = 4;
const ENTRY_SIZE = 8;
const BACKEND_DOMID = 0;

interface Grant {
  frame: number;
  readOnly: boolean;
}

export class SimGrantMapper implements GrantMapper {
  private readonly memoryFd: number;
  private readonly tableFd?: number;
  private readonly memory: Mapping;
  /** The memory as a plain Uint8Array: its subarrays are cheaper than a Buffer's. */
  private readonly memoryView: Uint8Array;
  private readonly table?: Mapping;
  private readonly tableView?: DataView;
  private readonly pages: number;
  private readonly entries: number;
  private readonly persistentGrants?: Map<number, Grant>;
  private readonly rings = new Set<Mapping>();
  private closed = false;
  /** The files' sizes as read in this turn of the event loop. */
  private sizes?: { memory: number; table: number };

  constructor(dir: string, readonly domid: number, persistent: boolean) {
    const domDir = path.join(dir, `dom${domid}`);
    const memoryPath = path.join(domDir, 'memory');
    const tablePath = path.join(domDir, 'grant-table');
    let fd: number | undefined;
    let tableFd: number | undefined;
    let memory: Mapping | undefined;
    try {
      fd = fs.openSync(memoryPath, 'r+');
      this.pages = Math.floor(fs.fstatSync(fd).size / PAGE);
      if (this.pages === 0) throw new GrantError(`${memoryPath} holds no whole page`);
      tableFd = fs.openSync(tablePath, 'r');
      this.entries = Math.floor(fs.fstatSync(tableFd).size / ENTRY_SIZE);
      memory = mapShared(fd, this.pages * PAGE, 0, true);
      if (this.entries > 0) this.table = mapShared(tableFd, this.entries * ENTRY_SIZE, 0, false);
    } catch (e) {
      memory?.unmap();
      if (fd !== undefined) fs.closeSync(fd);
      if (tableFd !== undefined) fs.closeSync(tableFd);
      if (e instanceof GrantError) throw e;
      throw new GrantError(`cannot map domain ${domid}'s memory: ${(e as Error).message}`);
    }
    this.memoryFd = fd;
    this.memory = memory;
    this.memoryView = new Uint8Array(memory.bytes.buffer, memory.bytes.byteOffset, memory.bytes.length);
    if (this.table) this.tableView = new DataView(this.table.bytes.buffer, this.table.bytes.byteOffset, this.table.bytes.length);
    if (this.table) this.tableFd = tableFd;
    else fs.closeSync(tableFd);
    if (persistent) this.persistentGrants = new Map();
  }

  /**
   * The files must still be as large as when they were mapped: touching a page of a
   * MAP_SHARED file beyond its end raises SIGBUS, which would take the whole process
   * down. XENSIM.md (detail 5) forbids shrinking them while connected; this check turns
   * a frontend that does it anyway into refused requests, and the ring's own check
   * (mapRing) into a failed connection.
   *
   * Two fstat calls cost more than the rest of a 4 KiB request's mapping, so the sizes
   * are read once per turn of the event loop: the queue checks its ring and maps every
   * request of a batch in one synchronous pass, before any of them touches a page.
   * What no check can catch: a shrink between the check and the access in that same
   * pass (microseconds), or during a provider's own copy into or out of a page. Only
   * copying through pread/pwrite instead of the mapping would close that window.
   */
  private checkSizes(): void {
    const { memory, table } = this.currentSizes();
    if (memory < this.pages * PAGE) throw new GrantError(`domain ${this.domid}'s memory file shrank to ${memory} bytes while connected`);
    if (table < this.entries * ENTRY_SIZE) throw new GrantError(`domain ${this.domid}'s grant table shrank while connected`);
  }

  /** The files' sizes now, read at most once per turn of the event loop. */
  private currentSizes(): { memory: number; table: number } {
    if (!this.sizes) {
      this.sizes = {
        memory: fs.fstatSync(this.memoryFd).size,
        table: this.tableFd !== undefined ? fs.fstatSync(this.tableFd).size : 0,
      };
      // Forgotten at the end of this iteration of the event loop: the ring check, the
      // mappings of a batch and the responses completed in the same turn share one read.
      setImmediate(() => {
        this.sizes = undefined;
      });
    }
    return this.sizes;
  }

  /** Reads and checks grant `ref` for the backend's use. */
  private grant(ref: number, writable: boolean): Grant {
    if (this.closed) throw new GrantError('connection closed');
    let grant = this.persistentGrants?.get(ref);
    if (!grant) {
      if (!Number.isInteger(ref) || ref < 0 || ref >= this.entries) throw new GrantError(`grant ${ref} is outside the grant table (${this.entries} entries)`);
      // Each field is loaded once and only the loaded values are used: the guest may
      // rewrite the entry while we look.
      const at = ref * ENTRY_SIZE;
      const flags = this.tableView!.getUint16(at, true);
      const domid = this.tableView!.getUint16(at + 2, true);
      const frame = this.tableView!.getUint32(at + 4, true);
      if ((flags & GTF_TYPE_MASK) !== GTF_PERMIT_ACCESS) throw new GrantError(`grant ${ref} is not granted (flags ${flags})`);
      if (domid !== BACKEND_DOMID) throw new GrantError(`grant ${ref} is granted to domain ${domid}, not ${BACKEND_DOMID}`);
      if (frame >= this.pages) throw new GrantError(`grant ${ref} names frame ${frame}, past the ${this.pages} pages of memory`);
      grant = { frame, readOnly: (flags & GTF_READONLY) !== 0 };
      this.persistentGrants?.set(ref, grant);
    }
    if (writable && grant.readOnly) throw new GrantError(`grant ${ref} is read-only`);
    return grant;
  }

  mapRing(refs: number[]): RingMapping {
    this.checkSizes();
    const frames = refs.map((r) => this.grant(r, true).frame);
    const mapping = mapPagesContiguous(this.memoryFd, frames, PAGE, true);
    const ringEnd = (Math.max(...frames) + 1) * PAGE;
    this.rings.add(mapping);
    return {
      bytes: mapping.bytes,
      // The ring needs only its own pages: a guest that cut its memory below them fails
      // the connection (data pages past the end are refused per request, in mapPages).
      check: () => {
        if (this.closed) throw new GrantError('connection closed');
        const memory = this.currentSizes().memory;
        if (memory < ringEnd) throw new GrantError(`domain ${this.domid}'s memory file shrank to ${memory} bytes, below its ring`);
      },
      unmap: () => {
        if (this.rings.delete(mapping)) mapping.unmap();
      },
    };
  }

  mapPages(refs: number[], writable: boolean): PageMapping {
    if (this.closed) throw new GrantError('connection closed');
    this.checkSizes();
    const frames = refs.map((r) => this.grant(r, writable).frame);
    const bytes = this.memoryView;
    return { pages: frames.map((f) => bytes.subarray(f * PAGE, (f + 1) * PAGE)), release() {} };
  }

  /**
   * Grant copy on the sim (tapkit's choice, `--grant-access copy`; the frontend cannot
   * tell): every piece's grant is checked first, then the bytes move; one status per piece.
   */
  copy(domid: number, pieces: CopyPiece[]): number[] {
    if (domid !== this.domid) throw new GrantError(`copy for domain ${domid} on domain ${this.domid}'s connection`);
    this.checkSizes();
    const frames = pieces.map((p) => this.grant(p.ref, p.direction === 'out').frame);
    pieces.forEach((p, i) => {
      const at = frames[i] * PAGE + p.offset;
      if (p.direction === 'in') p.local.set(this.memoryView.subarray(at, at + p.local.length));
      else this.memoryView.set(p.local, at);
    });
    return pieces.map(() => 0);
  }

  readonly access = 'grant map';

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const r of this.rings) r.unmap();
    this.rings.clear();
    this.memory.unmap();
    this.table?.unmap();
    fs.closeSync(this.memoryFd);
    if (this.tableFd !== undefined) fs.closeSync(this.tableFd);
    this.persistentGrants?.clear();
  }
}
