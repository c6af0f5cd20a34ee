/**
 * One blkif queue: a ring, its event channel, and the requests in flight on it.
 *
 * Requests are copied out of the ring once (BackRing.take) and parsed from that copy.
 * Every grant and range of a request is checked before any data moves; the data then
 * goes straight between the mapped guest pages and the VBD (no bounce buffer). Each
 * request gets exactly one response, with its id and operation (the inner one for
 * INDIRECT). Requests are taken half a ring per turn of the event loop; responses
 * completed in one turn are published together and the frontend is kicked only when it
 * asked (rsp_event); while requests are in flight the backend does not ask for kicks
 * (req_event) and looks for new requests each time it publishes responses, so a busy
 * ring is served in batches, and the frontend refills it while the backend works.
 */
import type { Vbd } from '../vbd';
import {
  type BlkifRequest,
  type Layout,
  OP_FLUSH_DISKCACHE,
  OP_READ,
  OP_WRITE,
  OP_WRITE_BARRIER,
  PAGE,
  parseRequest,
  parseSegment,
  responseOperation,
  RSP_EOPNOTSUPP,
  RSP_ERROR,
  RSP_OKAY,
  SECTOR,
  SECTORS_PER_PAGE,
  SEGMENT_SIZE,
  type Segment,
  writeResponse,
} from './abi';
import { GrantError, type EventChannel, type GrantMapper, type PageSpan } from './platform';
import { BackRing, RingOverrun } from './sring';

export interface QueueOptions {
  vbd: Vbd;
  layout: Layout;
  grants: GrantMapper;
  /** What the backend advertised in feature-max-indirect-segments. */
  maxIndirectSegments: number;
  /** feature-discard was advertised. */
  discard: boolean;
  /** Writes and discards are refused (the VBD is read-only, or the vbd's mode is r). */
  readOnly: boolean;
  /**
   * Throws when the ring's memory can no longer be touched (RingMapping.check); called
   * before the ring is read or written. The connection then fails.
   */
  checkRing?(): void;
  /** The frontend broke the protocol: the device must stop serving it. */
  onFatal(reason: string): void;
  /** A request was refused (for logs). */
  onRefused?(reason: string): void;
}

/**
 * Requests are taken in slices of half the ring per turn of the event loop. The
 * responses of one slice are published (and the frontend kicked, if it waits) before
 * the next slice is taken, so a frontend that resubmits as responses arrive refills one
 * half of the ring while the backend serves the other, and the backend finds those
 * requests without a notification. Taking the whole ring at once makes the two sides
 * take turns instead: the frontend idle while the backend serves the batch, the backend
 * asleep while the frontend refills. Smaller slices cost a turn and a notification
 * each, more than they save (measured in bench/xen).
 */
function sliceOf(ring: BackRing): number {
  return Math.max(1, ring.entries >>> 1);
}

/** The bytes of a mapped page that a segment uses. */
function segmentBytes(page: Uint8Array, s: Segment): Uint8Array {
  return s.firstSect === 0 && s.lastSect === SECTORS_PER_PAGE - 1 ? page : page.subarray(s.firstSect * SECTOR, (s.lastSect + 1) * SECTOR);
}

/** Sector numbers up to this one give byte offsets that are exact as plain numbers (the sum of two stays below 2^53). */
const MAX_EXACT_SECTOR = BigInt(Math.floor(Number.MAX_SAFE_INTEGER / SECTOR / 2));

/** A request answered with an error status, without touching data. */
class Refused extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

/** Responses completed in this turn, waiting to be written into the ring (parallel arrays: no object per response). */
class Answers {
  readonly ids: bigint[] = [];
  readonly operations: number[] = [];
  readonly statuses: number[] = [];
  count = 0;

  push(id: bigint, operation: number, status: number): void {
    this.ids[this.count] = id;
    this.operations[this.count] = operation;
    this.statuses[this.count] = status;
    this.count++;
  }

  clear(): void {
    this.count = 0;
  }
}

export class BlkifQueue {
  private channel?: EventChannel;
  private inFlight = 0;
  private barrier?: BlkifRequest;
  private stopping = false;
  private failed = false;
  private ringGone = false;
  private publishScheduled = false;
  private drained?: () => void;
  private readonly answers = new Answers();
  readonly stats = { requests: 0, kicksSent: 0, kicksReceived: 0, batches: 0 };

  constructor(
    readonly ring: BackRing,
    private readonly options: QueueOptions,
  ) {}

  attach(channel: EventChannel): void {
    this.channel = channel;
  }

  /** A notification from the frontend (or a first look after connecting). */
  kick(): void {
    this.stats.kicksReceived++;
    this.pump();
  }

  /** Consumes every request the frontend has produced, until a barrier or the end. */
  private pump(): void {
    if (this.stopping || this.failed) return;
    if (!this.ringReachable()) return;
    try {
      const slice = sliceOf(this.ring);
      let taken = 0;
      for (;;) {
        let n = this.ring.available();
        if (n > 0) this.stats.batches++;
        if (n > slice - taken) {
          // The rest waits for the next turn, after this slice's responses are out.
          n = slice - taken;
          this.schedulePublish();
        }
        taken += n;
        while (n-- > 0 && !this.barrier) {
          const request = parseRequest(this.ring.take(), this.options.layout, this.options.maxIndirectSegments);
          this.stats.requests++;
          if (request.kind === 'rw' && request.operation === OP_WRITE_BARRIER) {
            // Everything before it completes first, nothing after it starts before it.
            this.barrier = request;
            this.startBarrierIfDrained();
          } else {
            this.start(request);
          }
        }
        if (this.barrier || this.publishScheduled) return;
        // Ask for a kick only when idle; otherwise the next completion looks again.
        if (!this.ring.idle || !this.ring.finalCheck()) return;
      }
    } catch (e) {
      // Nothing a frontend puts in shared memory may escape as an exception: a bug
      // reached through hostile input fails this connection only.
      this.fail(e);
    }
  }

  private fail(e: unknown): void {
    if (this.failed) return;
    this.failed = true;
    const reason =
      e instanceof RingOverrun ? `ring overrun: ${e.message}` : e instanceof GrantError ? `ring unreachable: ${e.message}` : `internal error serving the ring: ${(e as Error).message}`;
    this.options.onFatal(reason);
    this.maybeDrained();
  }

  /**
   * False (and the connection failed) when the ring can no longer be touched. Other
   * failures (an overrun) still answer the requests already taken.
   */
  private ringReachable(): boolean {
    if (this.ringGone) return false;
    try {
      this.options.checkRing?.();
      return true;
    } catch (e) {
      this.ringGone = true;
      this.fail(e);
      return false;
    }
  }

  private startBarrierIfDrained(): void {
    if (this.barrier && this.inFlight === 0) {
      const request = this.barrier;
      this.start(request, () => {
        this.barrier = undefined;
      });
    }
  }

  private start(request: BlkifRequest, after?: () => void): void {
    this.inFlight++;
    this.serve(request).then(
      (status) => this.complete(request, status, after),
      (e) => {
        this.options.onRefused?.((e as Error).message);
        this.complete(request, e instanceof Refused ? e.status : RSP_ERROR, after);
      },
    );
  }

  private complete(request: BlkifRequest, status: number, after?: () => void): void {
    // Written into the ring when the turn's responses are published, all at once.
    this.answers.push(request.id, responseOperation(request), status);
    this.inFlight--;
    after?.();
    this.schedulePublish();
  }

  /** Publishes the responses completed by then and takes the next slice, at the end of this turn. */
  private schedulePublish(): void {
    if (this.publishScheduled) return;
    this.publishScheduled = true;
    setImmediate(() => this.publish());
  }

  private publish(): void {
    this.publishScheduled = false;
    // A ring that cannot be touched gets no more responses (the connection has failed).
    if (this.ringReachable()) {
      const { layout } = this.options;
      for (let i = 0; i < this.answers.count; i++) {
        writeResponse(this.ring.nextResponseSlot(), layout, this.answers.ids[i], this.answers.operations[i], this.answers.statuses[i]);
        this.ring.produced();
      }
      if (this.ring.pushResponses()) {
        this.stats.kicksSent++;
        this.channel?.notify();
      }
    }
    this.answers.clear();
    this.startBarrierIfDrained();
    this.pump();
    this.maybeDrained();
  }

  private maybeDrained(): void {
    if (this.inFlight === 0 && !this.publishScheduled && this.drained) {
      const done = this.drained;
      this.drained = undefined;
      done();
    }
  }

  /** Stops taking requests and resolves once every request taken has been answered. */
  stop(): Promise<void> {
    this.stopping = true;
    return new Promise((resolve) => {
      this.drained = resolve;
      this.maybeDrained();
    });
  }

  // ---- serving one request ------------------------------------------------------

  private async serve(request: BlkifRequest): Promise<number> {
    const { vbd } = this.options;
    switch (request.kind) {
      case 'malformed':
        throw new Refused(request.status, request.reason);
      case 'unknown':
        return RSP_EOPNOTSUPP;
      case 'discard': {
        if (!this.options.discard) return RSP_EOPNOTSUPP;
        if (request.secure) return RSP_EOPNOTSUPP; // discard-secure is not offered
        const { offset, length } = this.range(request.sector, request.nrSectors);
        if (this.options.readOnly) throw new Refused(RSP_ERROR, 'discard on a read-only disk');
        if (length > 0) await vbd.trim(offset, length);
        return RSP_OKAY;
      }
      case 'indirect':
        await this.transfer(request.innerOp, request.sector, this.indirectSegments(request));
        return RSP_OKAY;
      case 'rw':
        switch (request.operation) {
          case OP_READ:
          case OP_WRITE:
            await this.transfer(request.operation, request.sector, request.segments);
            return RSP_OKAY;
          case OP_FLUSH_DISKCACHE:
            // Earlier writes first (the VBD's flush is a barrier), then the data if any,
            // made durable too (Linux sends FUA writes this way).
            await vbd.flush();
            if (request.segments.length > 0) {
              await this.transfer(OP_WRITE, request.sector, request.segments);
              await vbd.flush();
            }
            return RSP_OKAY;
          case OP_WRITE_BARRIER:
            // The ring has drained before we get here; write, then make it durable.
            if (request.segments.length > 0) await this.transfer(OP_WRITE, request.sector, request.segments);
            await vbd.flush();
            return RSP_OKAY;
        }
    }
    return RSP_EOPNOTSUPP;
  }

  /** Byte range of `nrSectors` 512-byte sectors at `sector`, checked against the disk. */
  private range(sector: bigint, nrSectors: bigint | number): { offset: number; length: number } {
    // Plain numbers where they are exact (every disk smaller than 4 PiB): BigInt
    // arithmetic costs more than the rest of a 4 KiB request's checks.
    const size = this.options.vbd.info().size;
    if (sector <= MAX_EXACT_SECTOR && (typeof nrSectors === 'number' || nrSectors <= MAX_EXACT_SECTOR)) {
      const offset = Number(sector) * SECTOR;
      const length = Number(nrSectors) * SECTOR;
      if (offset + length > size) throw new Refused(RSP_ERROR, `sectors ${sector}+${nrSectors} pass the end of the disk`);
      return { offset, length };
    }
    const count = BigInt(nrSectors);
    const end = (sector + count) * BigInt(SECTOR);
    if (end > BigInt(size)) throw new Refused(RSP_ERROR, `sectors ${sector}+${nrSectors} pass the end of the disk`);
    return { offset: Number(sector * BigInt(SECTOR)), length: Number(count * BigInt(SECTOR)) };
  }

  /** Copies an indirect request's segment descriptors out of its indirect pages (once) and checks them. */
  private indirectSegments(request: Extract<BlkifRequest, { kind: 'indirect' }>): Segment[] {
    const mapping = this.map(request.indirectGrefs, false);
    const descriptors = new Uint8Array(request.nrSegments * SEGMENT_SIZE);
    try {
      mapping.pages.forEach((page, i) => {
        const start = i * PAGE;
        const bytes = Math.min(PAGE, descriptors.length - start);
        descriptors.set(page.subarray(0, bytes), start);
      });
    } finally {
      mapping.release();
    }
    const segments: Segment[] = [];
    for (let i = 0; i < request.nrSegments; i++) {
      const seg = parseSegment(descriptors, i * SEGMENT_SIZE);
      if (typeof seg === 'string') throw new Refused(RSP_ERROR, `indirect ${seg}`);
      segments.push(seg);
    }
    return segments;
  }

  private map(refs: number[], writable: boolean, spans?: PageSpan[]) {
    try {
      return this.options.grants.mapPages(refs, writable, spans);
    } catch (e) {
      if (e instanceof GrantError) throw new Refused(RSP_ERROR, e.message);
      throw e;
    }
  }

  /**
   * Moves data for a READ or WRITE: checks the range, the disk's mode and every grant
   * first, then passes views of the guest's pages to the VBD, merging segments that are
   * adjacent in memory into one call. Not an async function: its synchronous throws
   * (refusals before any data moves) reach `serve`, which turns them into its rejection.
   */
  private transfer(op: number, sector: bigint, segments: Segment[]): Promise<void> {
    const { vbd } = this.options;
    let sectors = 0;
    const refs = new Array<number>(segments.length);
    for (let i = 0; i < segments.length; i++) {
      sectors += segments[i].lastSect - segments[i].firstSect + 1;
      refs[i] = segments[i].gref;
    }
    const { offset } = this.range(sector, sectors);
    if (op === OP_WRITE && this.options.readOnly) throw new Refused(RSP_ERROR, 'write to a read-only disk');
    const mapping = this.map(refs, op === OP_READ, segments);
    const move = (bytes: Uint8Array, at: number) => (op === OP_READ ? vbd.read(bytes, at) : vbd.write(bytes, at));
    let io: Promise<void>;
    try {
      if (segments.length === 1) {
        io = move(segmentBytes(mapping.pages[0], segments[0]), offset);
      } else {
        const runs: Array<{ bytes: Uint8Array; offset: number }> = [];
        let at = offset;
        for (let i = 0; i < segments.length; i++) {
          const bytes = segmentBytes(mapping.pages[i], segments[i]);
          const last = runs[runs.length - 1];
          if (last && last.bytes.buffer === bytes.buffer && last.bytes.byteOffset + last.bytes.length === bytes.byteOffset) {
            last.bytes = new Uint8Array(bytes.buffer, last.bytes.byteOffset, last.bytes.length + bytes.length);
          } else {
            runs.push({ bytes, offset: at });
          }
          at += bytes.length;
        }
        // Wait for every run, even when one fails, before the pages are released.
        io = Promise.allSettled(runs.map((r) => move(r.bytes, r.offset))).then((results) => {
          const failure = results.find((r) => r.status === 'rejected');
          if (failure) throw (failure as PromiseRejectedResult).reason;
        });
      }
    } catch (e) {
      mapping.release(false);
      throw e;
    }
    // A copying platform writes a READ's data back to the guest only on release(true).
    return io.then(
      () => mapping.release(true),
      (e: unknown) => {
        mapping.release(false);
        throw e;
      },
    );
  }
}

