/**
 * A blkif frontend in TypeScript for the `sim` platform, written from XENSIM.md: guest
 * memory and a grant table in files it maps MAP_SHARED, port numbers on evtchn.sock,
 * XenStore over the wire protocol, and the frontend half of the ring (sring.ts's
 * FrontRing, abi.ts's encoder). The ava suite drives the same scenarios as the C
 * frontend with it, and the hostile ones that are easier to stage from here (bad keys,
 * missing files, random request slots).
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { type BlkifRequest, decodeResponse, encodeRequest, LAYOUTS, type Layout, PAGE, type Protocol, type Segment } from '../../core/ring/abi';
import { XenbusState } from '../../core/ring/device';
import { inTransaction } from '../../core/ring/platform';
import { XsClient } from '../../core/ring/sim/xs-client';
import { FrontRing } from '../../core/ring/sring';
import { backendPath, frontendPath } from '../../core/ring/toolstack';
import { mapShared, type Mapping } from '../../native/mman';

export const GTF_PERMIT_ACCESS = 1;
export const GTF_READONLY = 4;
const GRANT_ENTRIES = 16384;
const TIMEOUT_MS = 20_000;

export type Request = Exclude<BlkifRequest, { kind: 'malformed' } | { kind: 'unknown' }>;
/** A request to put: the id is optional (the frontend numbers them). */
export type NewRequest = Request extends unknown ? (Request extends infer R ? (R extends Request ? Omit<R, 'id'> & { id?: bigint } : never) : never) : never;
export interface Response {
  id: bigint;
  operation: number;
  status: number;
}

export interface FrontendOptions {
  abi?: 32 | 64;
  order?: number;
  queues?: number;
  persistent?: boolean;
  memPages?: number;
}

interface Queue {
  ring: FrontRing;
  port: number;
  ringPage: number;
  refs: number[];
}

/** A guest's memory and grant table files (XENSIM.md "D/dom<N>/..."). */
export class GuestMemory {
  readonly memory: Mapping;
  readonly table: Mapping;
  private nextPage = 1;
  private nextRef = 8;

  constructor(
    readonly dir: string,
    readonly domid: number,
    readonly pages: number,
  ) {
    const domDir = path.join(dir, `dom${domid}`);
    fs.mkdirSync(domDir, { recursive: true });
    this.memory = mapFile(path.join(domDir, 'memory'), pages * PAGE);
    this.table = mapFile(path.join(domDir, 'grant-table'), GRANT_ENTRIES * 8);
  }

  get bytes(): Buffer {
    return this.memory.bytes;
  }

  page(i: number): Buffer {
    return this.memory.bytes.subarray(i * PAGE, (i + 1) * PAGE);
  }

  allocPages(n: number): number {
    if (this.nextPage + n > this.pages) this.nextPage = 1 + 64;
    const p = this.nextPage;
    this.nextPage += n;
    return p;
  }

  /** Writes a grant entry (domid and frame first, flags last) and returns its reference. */
  grant(frame: number, readOnly = false, to = 0, flags = GTF_PERMIT_ACCESS): number {
    if (this.nextRef >= GRANT_ENTRIES) this.nextRef = 1024;
    const ref = this.nextRef++;
    const entry = this.table.bytes;
    entry.writeUInt16LE(to, ref * 8 + 2);
    entry.writeUInt32LE(frame, ref * 8 + 4);
    entry.writeUInt16LE(flags | (readOnly ? GTF_READONLY : 0), ref * 8);
    return ref;
  }

  close(): void {
    this.memory.unmap();
    this.table.unmap();
    fs.rmSync(path.join(this.dir, `dom${this.domid}`), { recursive: true, force: true });
  }
}

function mapFile(file: string, size: number): Mapping {
  const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC, 0o644);
  try {
    fs.ftruncateSync(fd, size);
    return mapShared(fd, size, 0, true);
  } finally {
    fs.closeSync(fd);
  }
}

/** The guest's end of evtchn.sock: raises ports, and hears the ports raised towards it. */
export class EventClient {
  private pending = Buffer.alloc(0);
  private listeners = new Set<(port: number) => void>();
  closed = false;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.pending = Buffer.concat([this.pending, chunk]);
      while (this.pending.length >= 4) {
        const port = this.pending.readUInt32LE(0);
        this.pending = this.pending.subarray(4);
        for (const l of this.listeners) l(port);
      }
    });
    socket.on('error', () => undefined);
    socket.on('close', () => (this.closed = true));
  }

  static connect(dir: string, domid: number): Promise<EventClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(path.join(dir, 'evtchn.sock'));
      socket.once('error', reject);
      socket.once('connect', () => {
        socket.off('error', reject);
        const hello = Buffer.alloc(4);
        hello.writeUInt32LE(domid);
        socket.write(hello);
        resolve(new EventClient(socket));
      });
    });
  }

  notify(port: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(port);
    this.socket.write(b);
  }

  onEvent(l: (port: number) => void): () => void {
    this.listeners.add(l);
    return () => this.listeners.delete(l);
  }

  close(): void {
    this.socket.destroy();
  }
}

export class TsFrontend {
  readonly layout: Layout;
  readonly fe: string;
  readonly be: string;
  queues: Queue[] = [];
  private nextId = 1n;
  private readonly waiting = new Map<bigint, (r: Response) => void>();
  /** Every response seen, in arrival order (hostile tests count them). */
  readonly responses: Response[] = [];
  sectors = 0;
  maxIndirect = 0;

  private constructor(
    readonly dir: string,
    readonly domid: number,
    readonly devid: number,
    readonly xs: XsClient,
    readonly events: EventClient,
    readonly mem: GuestMemory,
    readonly options: Required<FrontendOptions>,
  ) {
    this.layout = LAYOUTS[(options.abi === 32 ? 'x86_32-abi' : 'x86_64-abi') as Protocol];
    this.fe = frontendPath(domid, devid);
    this.be = backendPath(domid, devid);
    events.onEvent((port) => {
      for (const q of this.queues) if (q.port === port) this.reap(q);
    });
  }

  static async open(dir: string, domid: number, devid: number, options: FrontendOptions = {}): Promise<TsFrontend> {
    const o: Required<FrontendOptions> = { abi: 64, order: 0, queues: 1, persistent: false, memPages: 4096, ...options };
    const xs = await XsClient.connect(path.join(dir, 'xenstored.sock'));
    const mem = new GuestMemory(dir, domid, o.memPages);
    const events = await EventClient.connect(dir, domid);
    return new TsFrontend(dir, domid, devid, xs, events, mem, o);
  }

  async close(): Promise<void> {
    this.events.close();
    this.xs.close();
    this.mem.close();
  }

  setState(state: number): Promise<void> {
    return this.xs.write(`${this.fe}/state`, String(state));
  }

  async backendState(): Promise<number> {
    return Number((await this.xs.read(`${this.be}/state`)) ?? -1);
  }

  /** Waits (bounded) until the backend's state is `want`. */
  async waitBackend(want: number, timeoutMs = TIMEOUT_MS): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let wake = () => undefined as void;
    const watch = await this.xs.watch(`${this.be}/state`, () => wake());
    try {
      for (;;) {
        const s = await this.backendState();
        if (s === want) return;
        if (Date.now() > deadline) {
          throw new Error(`backend state ${s}, waited for ${want} (error: ${(await this.xs.read(`${this.be}/error`)) ?? 'none'})`);
        }
        await new Promise<void>((resolve) => {
          wake = resolve;
          setTimeout(resolve, 100);
        });
      }
    } finally {
      await watch.cancel();
    }
  }

  /** Builds the rings (fresh pages, fresh grants) for a new connection. */
  private setupRings(): void {
    const pages = 1 << this.options.order;
    this.queues = [];
    for (let q = 0; q < this.options.queues; q++) {
      const ringPage = this.mem.allocPages(pages);
      const bytes = this.mem.bytes.subarray(ringPage * PAGE, (ringPage + pages) * PAGE);
      bytes.fill(0);
      const ring = new FrontRing(bytes, this.layout.slotSize);
      ring.init();
      const refs = Array.from({ length: pages }, (_, i) => this.mem.grant(ringPage + i));
      this.queues.push({ ring, port: 10 + q + this.devid % 1000, ringPage, refs });
    }
  }

  /**
   * The frontend's handshake: Initialising, wait for InitWait, publish the transport keys
   * and Initialised in one transaction, wait for Connected, Connected. `override` changes
   * keys after the normal ones are written (a value of null removes the key), and
   * `expectConnected: false` stops after Initialised (for hostile keys).
   */
  async connect(options: { override?: Record<string, string | null | ((fe: TsFrontend) => string)>; expectConnected?: boolean } = {}): Promise<void> {
    await this.setState(XenbusState.Initialising);
    await this.waitBackend(XenbusState.InitWait);
    this.sectors = Number(await this.xs.read(`${this.be}/sectors`));
    this.maxIndirect = Number((await this.xs.read(`${this.be}/feature-max-indirect-segments`)) ?? 0);
    const { order, queues, abi, persistent } = this.options;
    this.setupRings();
    this.nextId = 1n;
    await inTransaction(this.xs, async (tx) => {
      for (const key of ['ring-ref', 'ring-page-order', 'multi-queue-num-queues', 'event-channel', 'protocol', 'feature-persistent']) await this.xs.rm(`${this.fe}/${key}`, tx);
      for (let k = 0; k < 16; k++) {
        await this.xs.rm(`${this.fe}/ring-ref${k}`, tx);
        await this.xs.rm(`${this.fe}/queue-${k}`, tx);
      }
      for (let q = 0; q < queues; q++) {
        const base = queues > 1 ? `${this.fe}/queue-${q}` : this.fe;
        const Q = this.queues[q];
        if (order === 0) await this.xs.write(`${base}/ring-ref`, String(Q.refs[0]), tx);
        else for (let i = 0; i < 1 << order; i++) await this.xs.write(`${base}/ring-ref${i}`, String(Q.refs[i]), tx);
        await this.xs.write(`${base}/event-channel`, String(Q.port), tx);
      }
      if (order > 0) await this.xs.write(`${this.fe}/ring-page-order`, String(order), tx);
      if (queues > 1) await this.xs.write(`${this.fe}/multi-queue-num-queues`, String(queues), tx);
      await this.xs.write(`${this.fe}/protocol`, abi === 32 ? 'x86_32-abi' : 'x86_64-abi', tx);
      await this.xs.write(`${this.fe}/feature-persistent`, persistent ? '1' : '0', tx);
      for (const [key, value] of Object.entries(options.override ?? {})) {
        if (value === null) await this.xs.rm(`${this.fe}/${key}`, tx);
        else await this.xs.write(`${this.fe}/${key}`, typeof value === 'function' ? value(this) : value, tx);
      }
      await this.xs.write(`${this.fe}/state`, String(XenbusState.Initialised), tx);
    });
    if (options.expectConnected === false) return;
    await this.waitBackend(XenbusState.Connected);
    await this.setState(XenbusState.Connected);
  }

  /** Closing, then Closed, each answered by the backend. */
  async disconnect(): Promise<void> {
    await this.setState(XenbusState.Closing);
    await this.waitBackend(XenbusState.Closing);
    await this.setState(XenbusState.Closed);
    await this.waitBackend(XenbusState.Closed);
  }

  /** Puts a request on queue `q` (not yet pushed); resolves with its response. */
  put(request: NewRequest, q = 0): Promise<Response> {
    const id = request.id ?? this.nextId++;
    const Q = this.queues[q];
    if (Q.ring.free === 0) throw new Error('the ring is full');
    encodeRequest(Q.ring.nextRequestSlot(), this.layout, { ...request, id } as Request);
    Q.ring.produced();
    return this.expect(id);
  }

  /** Puts raw slot bytes (any content) on queue `q`; resolves when a response with `id` arrives. */
  putRaw(slot: Uint8Array, id: bigint, q = 0): Promise<Response> {
    const Q = this.queues[q];
    Q.ring.nextRequestSlot().set(slot.subarray(0, this.layout.slotSize));
    Q.ring.produced();
    return this.expect(id);
  }

  private expect(id: bigint): Promise<Response> {
    return new Promise<Response>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        reject(new Error(`no response to request ${id}`));
      }, TIMEOUT_MS);
      this.waiting.set(id, (r) => {
        clearTimeout(timer);
        resolve(r);
      });
    });
  }

  /** Publishes the requests put so far and kicks the backend if it asked. */
  push(q = 0): void {
    const Q = this.queues[q];
    if (Q.ring.pushRequests()) this.events.notify(Q.port);
  }

  /** Puts and pushes one request. */
  send(request: NewRequest, q = 0): Promise<Response> {
    const r = this.put(request, q);
    this.push(q);
    return r;
  }

  private reap(Q: Queue): void {
    do {
      let n = Q.ring.responsesReady();
      while (n-- > 0) {
        const r = decodeResponse(Q.ring.takeResponse(), this.layout);
        this.responses.push(r);
        const w = this.waiting.get(r.id);
        this.waiting.delete(r.id);
        w?.(r);
      }
    } while (Q.ring.finalCheck());
  }

  /** A segment over a whole granted page. */
  segment(page: number, readOnly: boolean): Segment {
    return { gref: this.mem.grant(page, readOnly), firstSect: 0, lastSect: 7 };
  }

  /** Writes `pages` pages of the pattern at `sector` and reads them back into fresh pages. */
  async writeAndRead(sector: number, pages: number, seed: number, q = 0): Promise<void> {
    const src = this.mem.allocPages(pages);
    const dst = this.mem.allocPages(pages);
    fillPattern(this.mem.bytes.subarray(src * PAGE, (src + pages) * PAGE), sector * 512, seed);
    this.mem.bytes.fill(0, dst * PAGE, (dst + pages) * PAGE);
    const writes: Array<Promise<Response>> = [];
    const reads: Array<Promise<Response>> = [];
    for (let at = 0; at < pages; at += 11) {
      const n = Math.min(11, pages - at);
      const segs = Array.from({ length: n }, (_, i) => this.segment(src + at + i, true));
      writes.push(this.put({ kind: 'rw', operation: 1, handle: this.devid & 0xffff, sector: BigInt(sector + at * 8), segments: segs }, q));
    }
    this.push(q);
    for (const r of await Promise.all(writes)) if (r.status !== 0) throw new Error(`write at ${sector} answered ${r.status}`);
    for (let at = 0; at < pages; at += 11) {
      const n = Math.min(11, pages - at);
      const segs = Array.from({ length: n }, (_, i) => this.segment(dst + at + i, false));
      reads.push(this.put({ kind: 'rw', operation: 0, handle: this.devid & 0xffff, sector: BigInt(sector + at * 8), segments: segs }, q));
    }
    this.push(q);
    for (const r of await Promise.all(reads)) if (r.status !== 0) throw new Error(`read at ${sector} answered ${r.status}`);
    const back = this.mem.bytes.subarray(dst * PAGE, (dst + pages) * PAGE);
    const bad = firstPatternMismatch(back, sector * 512, seed);
    if (bad >= 0) throw new Error(`read back differs at disk offset ${bad}`);
  }
}

/** frontend.c's pattern() and harness.ts's pattern(), over a buffer. */
export function fillPattern(buf: Uint8Array, offset: number, seed: number): void {
  for (let i = 0; i < buf.length; i++) {
    const o = offset + i;
    buf[i] = (Math.floor(o / 512) * 31 + (o % 512) + seed) & 0xff;
  }
}

export function firstPatternMismatch(buf: Uint8Array, offset: number, seed: number): number {
  for (let i = 0; i < buf.length; i++) {
    const o = offset + i;
    if (buf[i] !== ((Math.floor(o / 512) * 31 + (o % 512) + seed) & 0xff)) return o;
  }
  return -1;
}
