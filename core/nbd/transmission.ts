/**
 * The transmission phase: parses pipelined requests out of the received bytes, runs them
 * on the export's VBD concurrently (up to a bound), and answers each one as it completes,
 * in any order.
 *
 * Flow control keeps memory bounded. A request is admitted only while fewer than
 * `maxInFlight` requests (and `maxInFlightBytes` of payload) are running and the replies
 * not yet taken by the client stay under `maxQueuedReplyBytes`; otherwise parsing stops
 * until something completes or the socket drains, and the connection stops reading from
 * the socket once a request's worth of bytes waits unparsed. A client that never reads
 * its replies therefore stops its own reads from being scheduled and nothing else.
 *
 * With extended headers (NBD_OPT_EXTENDED_HEADERS) requests are 32 bytes with a 64-bit
 * length that is a payload length when PAYLOAD_LEN is set (WRITE must set it) and an
 * effect length otherwise; every reply, even a bare success, is a 32-byte chunk header that
 * echoes the request's offset, and block status goes out as BLOCK_STATUS_EXT.
 */
import { isBlockError, type BlockError } from '../errors';
import type { Extent } from '../provider';
import { BufferPool } from './buffer-pool';
import type { ByteQueue } from './byte-queue';
import type { Negotiated } from './handshake';
import {
  ALLOWED_FLAGS, BASE_ALLOCATION_ID, CHUNK_HEADER_SIZE, Cmd, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA,
  CMD_FLAG_NO_HOLE, CMD_FLAG_PAYLOAD_LEN, CMD_FLAG_REQ_ONE, EXTENDED_CHUNK_HEADER_SIZE, EXTENDED_REPLY_MAGIC,
  EXTENDED_REQUEST_MAGIC, EXTENDED_REQUEST_SIZE, NBD_EINVAL, NBD_EIO, NBD_EOVERFLOW, NBD_EPERM, REPLY_BLOCK_STATUS,
  REPLY_BLOCK_STATUS_EXT, REPLY_ERROR, REPLY_ERROR_OFFSET, REPLY_FLAG_DONE, REPLY_NONE, REPLY_OFFSET_DATA,
  REPLY_OFFSET_HOLE, REQUEST_MAGIC, REQUEST_SIZE, SIMPLE_REPLY_MAGIC, SIMPLE_REPLY_SIZE, STATE_HOLE, STATE_ZERO,
  STRUCTURED_REPLY_MAGIC, TF_READ_ONLY, TF_SEND_FAST_ZERO, nbdErrorFor,
} from './protocol';

export interface TransmissionLimits {
  /** Largest READ/WRITE payload (also advertised as the maximum block size). */
  maxRequest: number;
  /** Requests of one connection running at once. */
  maxInFlight: number;
  /** Payload bytes of running requests (reads and writes) of one connection. */
  maxInFlightBytes: number;
  /** Reply bytes queued for a client that is slow to read them, before parsing stops. */
  maxQueuedReplyBytes: number;
}

export const DEFAULT_LIMITS: TransmissionLimits = {
  maxRequest: 32 * 1024 * 1024,
  maxInFlight: 64,
  maxInFlightBytes: 64 * 1024 * 1024,
  maxQueuedReplyBytes: 32 * 1024 * 1024,
};

/** Where replies go: the connection batches them per event-loop turn. */
export interface ReplySink {
  /** Queues bytes for the client; `written` runs once the socket no longer needs `data`. */
  send(data: Uint8Array, written?: () => void): void;
  /** Bytes handed to the socket and not yet written to the kernel. */
  readonly queuedBytes: number;
}

/** How the transmission phase tells its connection what to do. */
export interface TransmissionHost {
  /** The client broke the protocol so that the stream cannot be resynchronized. */
  protocolError(reason: string): void;
  /** DISC received (or shutdown) and every request answered: close cleanly. */
  finished(): void;
}

/** A READ smaller than this is never split into data and hole chunks. */
const HOLE_SPLIT_MIN = 64 * 1024;
/** Hole runs shorter than this inside a READ are sent as data (fewer, larger chunks). */
const HOLE_CHUNK_MIN = 4096;
/** Extents in one BLOCK_STATUS reply; the client asks again for the rest. */
const MAX_EXTENTS = 65536;
/**
 * After this many READs in a row whose extents showed no hole, stop asking for a while:
 * on some files finding the next hole is costly (tmpfs scans to the end of the file).
 */
const ALL_DATA_STREAK = 8;
const HOLE_LOOKUP_PAUSE = 256;
/** WRITE payloads from this size on are copied into pooled buffers. */
const LARGE_PAYLOAD = 128 * 1024;
/** Longest error message sent in a structured error chunk. */
const MAX_MESSAGE = 1024;

/** A reply's bytes: `first` (a header, with the data after it when it was read into it), then borrowed views. */
interface DataReply {
  first: Buffer;
  views: Uint8Array[];
  /** `first` came from the buffer pool and goes back once written. */
  pooled: boolean;
  /** `views` were lent by the VBD and are given back once written. */
  lent?: boolean;
}

interface Request {
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  offset: number;
  length: number;
}

export class Transmission {
  private inFlight = 0;
  private inFlightBytes = 0;
  /**
   * A WRITE whose payload has not fully arrived yet. A large payload is gathered into a
   * pooled buffer as it arrives (`filled` bytes so far); a small one waits in the queue.
   */
  private pendingWrite: { request: Request; payload: Buffer | undefined; filled: number } | undefined;
  /** Payload bytes of a refused request still to be dropped, and the refusal to send then. */
  private skipping = 0;
  private skipped: { request: Request; message: string } | undefined;
  /** No more requests are parsed (DISC, shutdown, protocol error). */
  private stopped = false;
  private pumping = false;
  private readonly structured: boolean;
  private readonly extended: boolean;
  /** Request and reply chunk header sizes: compact or extended. */
  private readonly requestSize: number;
  private readonly chunkHeaderSize: number;
  private readonly size: number;
  private readonly buffers = new BufferPool();
  /** READs in a row whose extents were all data, and READs left before extents are asked again. */
  private allDataReads = 0;
  private holeLookupPause = 0;

  constructor(
    private readonly negotiated: Negotiated,
    private readonly queue: ByteQueue,
    private readonly out: ReplySink,
    private readonly limits: TransmissionLimits,
    private readonly host: TransmissionHost,
  ) {
    this.structured = negotiated.structured;
    this.extended = negotiated.extended;
    this.requestSize = this.extended ? EXTENDED_REQUEST_SIZE : REQUEST_SIZE;
    this.chunkHeaderSize = this.extended ? EXTENDED_CHUNK_HEADER_SIZE : CHUNK_HEADER_SIZE;
    this.size = negotiated.export.vbd.info().size;
  }

  /** Requests running now. */
  get running(): number {
    return this.inFlight;
  }

  /** Unparsed bytes the connection may hold before it stops reading the socket. */
  get receiveLimit(): number {
    return this.limits.maxRequest + EXTENDED_REQUEST_SIZE + 64 * 1024;
  }

  /** Stops parsing; `finished` fires once every running request is answered. */
  stop(): void {
    this.stopped = true;
    this.maybeFinished();
  }

  /** Parses and starts every complete request that flow control admits. */
  pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (!this.stopped) {
        if (this.skipping > 0) {
          this.skipping -= this.queue.skip(this.skipping);
          if (this.skipping > 0) break;
          const refused = this.skipped!;
          this.skipped = undefined;
          this.replyError(refused.request, NBD_EINVAL, refused.message);
          continue;
        }
        if (this.pendingWrite) {
          if (!this.gatherPayload(this.pendingWrite)) break;
          continue;
        }
        if (!this.admits()) break;
        if (this.queue.length < this.requestSize) break;
        this.parseRequest();
      }
    } finally {
      this.pumping = false;
    }
  }

  private admits(): boolean {
    return (
      this.inFlight < this.limits.maxInFlight &&
      this.inFlightBytes < this.limits.maxInFlightBytes &&
      this.out.queuedBytes < this.limits.maxQueuedReplyBytes
    );
  }

  private parseRequest(): void {
    const { buf, at } = this.queue.takeView(this.requestSize);
    const magic = buf.readUInt32BE(at);
    if (magic !== (this.extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC)) {
      this.stopped = true;
      this.host.protocolError(`bad request magic 0x${magic.toString(16)}`);
      return;
    }
    const request: Request = {
      flags: buf.readUInt16BE(at + 4),
      type: buf.readUInt16BE(at + 6),
      cookieHi: buf.readUInt32BE(at + 8),
      cookieLo: buf.readUInt32BE(at + 12),
      // Exact below 2^53; anything larger is past the end of every disk and refused.
      offset: readU64(buf, at + 16),
      length: this.extended ? readU64(buf, at + 24) : buf.readUInt32BE(at + 24),
    };
    if (this.extended) return this.parseExtended(request);
    if (request.type === Cmd.WRITE) {
      if (request.length > this.limits.maxRequest) {
        // Drop the payload as it streams in (never buffered), then refuse the write.
        this.skip(request, `write of ${request.length} bytes is over the maximum of ${this.limits.maxRequest}`);
      } else {
        this.expectPayload(request);
      }
      return;
    }
    this.start(request);
  }

  /** Extended headers: a payload follows exactly when PAYLOAD_LEN is set. */
  private parseExtended(request: Request): void {
    const payload = (request.flags & CMD_FLAG_PAYLOAD_LEN) !== 0;
    if (payload && request.length > this.limits.maxRequest) {
      // The protocol asks for a hard disconnect: such a payload cannot be told from garbage.
      this.stopped = true;
      this.host.protocolError(`payload of ${request.length} bytes is over the maximum of ${this.limits.maxRequest}`);
      return;
    }
    if (request.type === Cmd.WRITE) {
      if (payload) this.expectPayload(request);
      else this.track(request, 0, () => this.replyError(request, NBD_EINVAL, 'WRITE without PAYLOAD_LEN under extended headers'));
      return;
    }
    // No other command takes a payload here (BLOCK_STATUS_PAYLOAD is not offered): read it, refuse.
    if (payload) return this.skip(request, `command ${request.type} takes no payload`);
    this.start(request);
  }

  private skip(request: Request, message: string): void {
    this.skipping = request.length;
    this.skipped = { request, message };
  }

  // ---- running requests -------------------------------------------------------------

  /**
   * A WRITE's payload follows. A large one spans many received chunks and must be copied
   * anyway: into a pooled buffer, given back once the write is done (the caller owns the
   * buffer, so no provider keeps it past the write); the connection may even have the
   * socket read straight into it (`payloadTarget`).
   */
  private expectPayload(request: Request): void {
    const payload = request.length >= LARGE_PAYLOAD ? this.buffers.take(request.length) : undefined;
    this.pendingWrite = { request, payload, filled: 0 };
  }

  /** Moves what has arrived of the pending payload out of the queue; true once the write started. */
  private gatherPayload(pending: { request: Request; payload: Buffer | undefined; filled: number }): boolean {
    const { request, payload } = pending;
    if (!payload) {
      if (this.queue.length < request.length) return false;
      this.pendingWrite = undefined;
      this.startWrite(request, this.queue.take(request.length));
      return true;
    }
    const n = Math.min(this.queue.length, payload.length - pending.filled);
    this.queue.copyInto(payload, pending.filled, n);
    pending.filled += n;
    if (pending.filled < payload.length) return false;
    this.pendingWrite = undefined;
    this.startWrite(request, payload);
    return true;
  }

  /**
   * Where the socket may put the next bytes it reads so that they need no copy: the rest
   * of a large WRITE payload, once nothing else waits in the queue before it.
   */
  payloadTarget(): Uint8Array | undefined {
    const pending = this.pendingWrite;
    if (!pending?.payload || this.stopped || this.queue.length > 0) return undefined;
    return pending.payload.subarray(pending.filled);
  }

  /** `n` bytes were read into the view `payloadTarget` gave. */
  payloadReceived(n: number): void {
    const pending = this.pendingWrite!;
    pending.filled += n;
  }

  private startWrite(request: Request, payload: Buffer): void {
    this.track(request, payload.length, async () => {
      try {
        const refusal = this.checkFlags(request) ?? this.checkWritable();
        if (refusal) return this.replyError(request, refusal[0], refusal[1]);
        await this.negotiated.export.vbd.write(payload, request.offset, { fua: (request.flags & CMD_FLAG_FUA) !== 0 });
        this.replyOk(request);
      } finally {
        if (payload.length >= LARGE_PAYLOAD) this.buffers.give(payload);
      }
    });
  }

  private start(request: Request): void {
    if (request.type === Cmd.DISC) {
      this.stopped = true;
      this.maybeFinished();
      return;
    }
    const bytes = request.type === Cmd.READ ? Math.min(request.length, this.limits.maxRequest) : 0;
    this.track(request, bytes, () => this.execute(request));
  }

  /** Runs one request with accounting; any failure becomes an error reply, never a disconnect. */
  private track(request: Request, bytes: number, body: () => Promise<void> | void): void {
    this.inFlight++;
    this.inFlightBytes += bytes;
    const settle = () => {
      this.inFlight--;
      this.inFlightBytes -= bytes;
      this.maybeFinished();
      this.pump();
    };
    let result: Promise<void> | void;
    try {
      result = body();
    } catch (e) {
      this.replyFailure(request, e);
      settle();
      return;
    }
    Promise.resolve(result).then(settle, (e) => {
      this.replyFailure(request, e);
      settle();
    });
  }

  private async execute(request: Request): Promise<void> {
    const refusal = this.checkFlags(request);
    if (refusal) return this.replyError(request, refusal[0], refusal[1]);
    const vbd = this.negotiated.export.vbd;
    const fua = (request.flags & CMD_FLAG_FUA) !== 0;
    switch (request.type) {
      case Cmd.READ:
        return this.read(request);
      case Cmd.FLUSH:
        await vbd.flush();
        return this.replyOk(request);
      case Cmd.TRIM: {
        const refused = this.checkWritable();
        if (refused) return this.replyError(request, refused[0], refused[1]);
        // The VBD says ENOSPC past the end (right for writes); NBD wants EINVAL for TRIM.
        if (request.offset + request.length > this.size) return this.replyError(request, NBD_EINVAL, `trim range is past the end (size ${this.size})`);
        await vbd.trim(request.offset, request.length, { fua });
        return this.replyOk(request);
      }
      case Cmd.WRITE_ZEROES: {
        const refused = this.checkWritable();
        if (refused) return this.replyError(request, refused[0], refused[1]);
        await vbd.zero(request.offset, request.length, {
          mayTrim: (request.flags & CMD_FLAG_NO_HOLE) === 0,
          fua,
          fast: (request.flags & CMD_FLAG_FAST_ZERO) !== 0,
        });
        return this.replyOk(request);
      }
      case Cmd.CACHE:
        if (request.offset + request.length > this.size) return this.replyError(request, NBD_EINVAL, `cache range is past the end (size ${this.size})`);
        // Advisory: prefetch at most one maximum-size request's worth.
        await vbd.cache(request.offset, Math.min(request.length, this.limits.maxRequest));
        return this.replyOk(request);
      case Cmd.BLOCK_STATUS:
        return this.blockStatus(request);
      default:
        return this.replyError(request, NBD_EINVAL, `unknown command ${request.type}`);
    }
  }

  /** Flags this command may carry on this connection, or the refusal to send. */
  private checkFlags(request: Request): [number, string] | undefined {
    const allowed = ALLOWED_FLAGS[request.type];
    if (allowed === undefined) return [NBD_EINVAL, `unknown command ${request.type}`];
    let valid = allowed;
    if (!this.structured) valid &= ~CMD_FLAG_DF;
    if (!this.extended) valid &= ~CMD_FLAG_PAYLOAD_LEN;
    if (!(this.negotiated.flags & TF_SEND_FAST_ZERO)) valid &= ~CMD_FLAG_FAST_ZERO;
    if (request.flags & ~valid) return [NBD_EINVAL, `flags 0x${request.flags.toString(16)} are not valid on command ${request.type}`];
    return undefined;
  }

  private checkWritable(): [number, string] | undefined {
    if (this.negotiated.flags & TF_READ_ONLY) return [NBD_EPERM, `export '${this.negotiated.export.name}' is read-only`];
    return undefined;
  }

  // ---- READ -------------------------------------------------------------------------

  private async read(request: Request): Promise<void> {
    const { offset, length } = request;
    const df = (request.flags & CMD_FLAG_DF) !== 0;
    if (length > this.limits.maxRequest) {
      return this.replyError(request, df ? NBD_EOVERFLOW : NBD_EINVAL, `read of ${length} bytes is over the maximum of ${this.limits.maxRequest}`);
    }
    const vbd = this.negotiated.export.vbd;
    if (offset + length > this.size) return this.replyError(request, NBD_EINVAL, `read ${offset}+${length} is past the end (size ${this.size})`);
    if (!this.structured) {
      // Read first, send after: an error found later could not be reported.
      const header = SIMPLE_REPLY_SIZE;
      const reply = await this.readData(offset, length, header);
      this.writeSimpleHeader(reply.first, request, 0);
      this.sendReply(reply);
      return;
    }
    if (length === 0) return this.out.send(this.chunkHeader(request, REPLY_FLAG_DONE, REPLY_NONE, 0));
    const runs = !df && length >= HOLE_SPLIT_MIN && vbd.capabilities().extents ? await this.holeRuns(offset, length) : undefined;
    if (!runs) {
      const reply = await this.readData(offset, length, this.chunkHeaderSize + 8);
      this.writeDataHeader(reply.first, request, offset, length, REPLY_FLAG_DONE);
      this.sendReply(reply);
      return;
    }
    // Data runs are read concurrently; holes go out as OFFSET_HOLE without touching data.
    const replies: DataReply[] = [];
    const failures: Array<{ offset: number; error: unknown }> = [];
    await Promise.all(
      runs.map(async (run) => {
        if (run.type !== 'data') {
          const hole = this.chunkHeader(request, 0, REPLY_OFFSET_HOLE, 12, 12);
          writeU64(hole, run.offset, this.chunkHeaderSize);
          hole.writeUInt32BE(run.length, this.chunkHeaderSize + 8);
          replies.push({ first: hole, views: [], pooled: false });
          return;
        }
        try {
          const reply = await this.readData(run.offset, run.length, this.chunkHeaderSize + 8);
          this.writeDataHeader(reply.first, request, run.offset, run.length, 0);
          replies.push(reply);
        } catch (error) {
          failures.push({ offset: run.offset, error });
        }
      }),
    );
    for (const failure of failures) {
      const { code, message } = describe(failure.error);
      const chunk = this.errorChunk(request, REPLY_ERROR_OFFSET, code ? nbdErrorFor(code) : NBD_EIO, message, failure.offset);
      replies.push({ first: chunk, views: [], pooled: false });
    }
    replies[replies.length - 1].first.writeUInt16BE(REPLY_FLAG_DONE, 4);
    for (const reply of replies) this.sendReply(reply);
  }

  /**
   * `length` bytes at `offset` behind `header` bytes of room for a reply header. A VBD
   * that lends its memory gives views sent as they are (no copy); otherwise (or where it
   * lends nothing for this range) the data is read into one pooled buffer right after the
   * header, so header and data leave as one.
   */
  private async readData(offset: number, length: number, header: number): Promise<DataReply> {
    const vbd = this.negotiated.export.vbd;
    if (vbd.lendsReads && length > 0) {
      let pooled: Buffer | undefined;
      const views = await vbd.readViews(offset, length, () => (pooled = this.buffers.take(header + length)).subarray(header));
      if (pooled) return { first: pooled, views: [], pooled: true };
      return { first: Buffer.allocUnsafe(header), views, pooled: false, lent: true };
    }
    const buf = this.buffers.take(header + length);
    if (length > 0) await vbd.read(buf.subarray(header), offset);
    return { first: buf, views: [], pooled: true };
  }

  /** Queues a reply; a pooled buffer goes back to the pool once the socket is done with it. */
  private sendReply(reply: DataReply): void {
    const { first } = reply;
    if (reply.pooled) this.out.send(first, () => this.buffers.give(first));
    else this.out.send(first);
    const { views } = reply;
    const last = views.length - 1;
    for (let i = 0; i < last; i++) this.out.send(views[i]);
    // Written in order: once the last view is written, all of them are.
    if (last >= 0) this.out.send(views[last], reply.lent ? () => this.negotiated.export.vbd.returnViews(views) : undefined);
  }

  /**
   * readRuns, unless the last reads of this connection all found data only: then extents
   * are skipped for a while and reads go out as data (still correct, holes read as zeros).
   */
  private async holeRuns(offset: number, length: number): Promise<Array<{ offset: number; length: number; type: 'data' | 'hole' }> | undefined> {
    if (this.holeLookupPause > 0) {
      this.holeLookupPause--;
      return undefined;
    }
    const runs = await this.readRuns(offset, length);
    if (runs) {
      this.allDataReads = 0;
    } else if (++this.allDataReads >= ALL_DATA_STREAK) {
      this.allDataReads = 0;
      this.holeLookupPause = HOLE_LOOKUP_PAUSE;
    }
    return runs;
  }

  /** The read range as data and hole runs (hole = reads as zeros), or undefined when it is all data. */
  private async readRuns(offset: number, length: number): Promise<Array<{ offset: number; length: number; type: 'data' | 'hole' }> | undefined> {
    let extents: Extent[];
    try {
      extents = await this.negotiated.export.vbd.extents(offset, length);
    } catch {
      return undefined; // the read itself will tell whether something is wrong
    }
    const runs: Array<{ offset: number; length: number; type: 'data' | 'hole' }> = [];
    for (const e of extents) {
      const type = e.type === 'data' || e.length < HOLE_CHUNK_MIN ? 'data' : 'hole';
      const last = runs[runs.length - 1];
      if (last && last.type === type) last.length += e.length;
      else runs.push({ offset: e.offset, length: e.length, type });
    }
    if (runs.length === 1 && runs[0].type === 'data') return undefined;
    return runs;
  }

  // ---- BLOCK_STATUS -----------------------------------------------------------------

  private async blockStatus(request: Request): Promise<void> {
    if (!this.structured || !this.negotiated.allocationContext) {
      return this.replyError(request, NBD_EINVAL, 'BLOCK_STATUS needs structured replies and base:allocation selected');
    }
    if (request.length === 0) return this.replyError(request, NBD_EINVAL, 'BLOCK_STATUS of length 0');
    if (request.offset + request.length > this.size) {
      return this.replyError(request, NBD_EINVAL, `block status ${request.offset}+${request.length} is past the end (size ${this.size})`);
    }
    let extents = await this.negotiated.export.vbd.extents(request.offset, request.length);
    if (request.flags & CMD_FLAG_REQ_ONE) extents = extents.slice(0, 1);
    else if (extents.length > MAX_EXTENTS) extents = extents.slice(0, MAX_EXTENTS);
    const state = (e: Extent) => (e.type === 'data' ? 0 : e.type === 'zero' ? STATE_ZERO : STATE_HOLE | STATE_ZERO);
    const h = this.chunkHeaderSize;
    if (this.extended) {
      // BLOCK_STATUS_EXT: context id, descriptor count, then (length u64, status u64) each.
      const payload = 8 + 16 * extents.length;
      const chunk = this.chunkHeader(request, REPLY_FLAG_DONE, REPLY_BLOCK_STATUS_EXT, payload, payload);
      chunk.writeUInt32BE(BASE_ALLOCATION_ID, h);
      chunk.writeUInt32BE(extents.length, h + 4);
      let at = h + 8;
      for (const e of extents) {
        writeU64(chunk, e.length, at);
        writeU64(chunk, state(e), at + 8);
        at += 16;
      }
      this.out.send(chunk);
      return;
    }
    const payload = 4 + 8 * extents.length;
    const chunk = this.chunkHeader(request, REPLY_FLAG_DONE, REPLY_BLOCK_STATUS, payload, payload);
    chunk.writeUInt32BE(BASE_ALLOCATION_ID, h);
    let at = h + 4;
    for (const e of extents) {
      chunk.writeUInt32BE(e.length, at);
      chunk.writeUInt32BE(state(e), at + 4);
      at += 8;
    }
    this.out.send(chunk);
  }

  // ---- replies ----------------------------------------------------------------------

  private replyOk(request: Request): void {
    // Extended headers allow no simple replies: success is an empty NONE chunk.
    if (this.extended) return this.out.send(this.chunkHeader(request, REPLY_FLAG_DONE, REPLY_NONE, 0));
    const reply = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
    this.writeSimpleHeader(reply, request, 0);
    this.out.send(reply);
  }

  private replyFailure(request: Request, error: unknown): void {
    const { code, message } = describe(error);
    const nbdError = code
      ? nbdErrorFor(code, { fastZero: (request.flags & CMD_FLAG_FAST_ZERO) !== 0, df: (request.flags & CMD_FLAG_DF) !== 0 })
      : NBD_EIO;
    this.replyError(request, nbdError, message);
  }

  /** An error reply: a structured ERROR chunk (with its message) once structured replies are on. */
  private replyError(request: Request, error: number, message: string): void {
    if (this.structured) {
      this.out.send(this.errorChunk(request, REPLY_ERROR, error, message));
      return;
    }
    const reply = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
    this.writeSimpleHeader(reply, request, error);
    this.out.send(reply);
  }

  private writeSimpleHeader(reply: Buffer, request: Request, error: number): void {
    reply.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
    reply.writeUInt32BE(error, 4);
    reply.writeUInt32BE(request.cookieHi, 8);
    reply.writeUInt32BE(request.cookieLo, 12);
  }

  /** A chunk header (structured or extended) followed by `extra` bytes of room for the payload. */
  private chunkHeader(request: Request, flags: number, type: number, payloadLength: number, extra = 0): Buffer {
    const chunk = Buffer.allocUnsafe(this.chunkHeaderSize + extra);
    this.writeChunkHeader(chunk, request, flags, type, payloadLength);
    return chunk;
  }

  private writeChunkHeader(chunk: Buffer, request: Request, flags: number, type: number, payloadLength: number): void {
    chunk.writeUInt32BE(this.extended ? EXTENDED_REPLY_MAGIC : STRUCTURED_REPLY_MAGIC, 0);
    chunk.writeUInt16BE(flags, 4);
    chunk.writeUInt16BE(type, 6);
    chunk.writeUInt32BE(request.cookieHi, 8);
    chunk.writeUInt32BE(request.cookieLo, 12);
    if (this.extended) {
      writeU64(chunk, request.offset, 16);
      writeU64(chunk, payloadLength, 24);
    } else {
      chunk.writeUInt32BE(payloadLength, 16);
    }
  }

  /** Fills in an OFFSET_DATA chunk header (and the data's offset) at the start of `buf`. */
  private writeDataHeader(buf: Buffer, request: Request, offset: number, length: number, flags: number): void {
    this.writeChunkHeader(buf, request, flags, REPLY_OFFSET_DATA, 8 + length);
    writeU64(buf, offset, this.chunkHeaderSize);
  }

  private errorChunk(request: Request, type: number, error: number, message: string, offset?: number): Buffer {
    const text = Buffer.from(message.slice(0, MAX_MESSAGE), 'utf8');
    const payload = 6 + text.length + (offset === undefined ? 0 : 8);
    const h = this.chunkHeaderSize;
    const chunk = this.chunkHeader(request, REPLY_FLAG_DONE, type, payload, payload);
    chunk.writeUInt32BE(error, h);
    chunk.writeUInt16BE(text.length, h + 4);
    text.copy(chunk, h + 6);
    if (offset !== undefined) writeU64(chunk, offset, h + 6 + text.length);
    return chunk;
  }

  private maybeFinished(): void {
    if (this.stopped && this.inFlight === 0) this.host.finished();
  }
}

function describe(error: unknown): { code: BlockError['code'] | undefined; message: string } {
  if (isBlockError(error)) return { code: error.code, message: error.message };
  return { code: undefined, message: error instanceof Error ? error.message : String(error) };
}

/** A u64 as a number: exact below 2^53, which covers every offset and length that can be valid. */
function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * 0x100000000 + buf.readUInt32BE(at + 4);
}

function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / 0x100000000), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}
