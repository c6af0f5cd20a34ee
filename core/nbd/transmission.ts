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
 */
import { isBlockError, type BlockError } from '../errors';
import type { Extent } from '../provider';
import type { ByteQueue } from './byte-queue';
import type { Negotiated } from './handshake';
import {
  ALLOWED_FLAGS, BASE_ALLOCATION_ID, CHUNK_HEADER_SIZE, Cmd, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA,
  CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, NBD_EINVAL, NBD_EIO, NBD_EOVERFLOW, NBD_EPERM, REPLY_BLOCK_STATUS,
  REPLY_ERROR, REPLY_ERROR_OFFSET, REPLY_FLAG_DONE, REPLY_NONE, REPLY_OFFSET_DATA, REPLY_OFFSET_HOLE,
  REQUEST_MAGIC, REQUEST_SIZE, SIMPLE_REPLY_MAGIC, SIMPLE_REPLY_SIZE, STATE_HOLE, STATE_ZERO,
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
  send(data: Buffer): void;
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
/** Longest error message sent in a structured error chunk. */
const MAX_MESSAGE = 1024;

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
  /** A WRITE whose payload has not fully arrived yet. */
  private pendingWrite: Request | undefined;
  /** Payload bytes of a refused WRITE still to be dropped. */
  private skipping = 0;
  private skipped: Request | undefined;
  /** No more requests are parsed (DISC, shutdown, protocol error). */
  private stopped = false;
  private pumping = false;
  private readonly structured: boolean;
  private readonly size: number;

  constructor(
    private readonly negotiated: Negotiated,
    private readonly queue: ByteQueue,
    private readonly out: ReplySink,
    private readonly limits: TransmissionLimits,
    private readonly host: TransmissionHost,
  ) {
    this.structured = negotiated.structured;
    this.size = negotiated.export.vbd.info().size;
  }

  /** Requests running now. */
  get running(): number {
    return this.inFlight;
  }

  /** Unparsed bytes the connection may hold before it stops reading the socket. */
  get receiveLimit(): number {
    return this.limits.maxRequest + REQUEST_SIZE + 64 * 1024;
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
          this.replyError(refused, NBD_EINVAL, `write of ${refused.length} bytes is over the maximum of ${this.limits.maxRequest}`);
          continue;
        }
        if (this.pendingWrite) {
          const request = this.pendingWrite;
          if (this.queue.length < request.length) break;
          this.pendingWrite = undefined;
          this.startWrite(request, this.queue.take(request.length));
          continue;
        }
        if (!this.admits()) break;
        if (this.queue.length < REQUEST_SIZE) break;
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
    const { buf, at } = this.queue.takeView(REQUEST_SIZE);
    if (buf.readUInt32BE(at) !== REQUEST_MAGIC) {
      this.stopped = true;
      this.host.protocolError(`bad request magic 0x${buf.readUInt32BE(at).toString(16)}`);
      return;
    }
    const request: Request = {
      flags: buf.readUInt16BE(at + 4),
      type: buf.readUInt16BE(at + 6),
      cookieHi: buf.readUInt32BE(at + 8),
      cookieLo: buf.readUInt32BE(at + 12),
      // Exact below 2^53; anything larger is past the end of every disk and refused.
      offset: buf.readUInt32BE(at + 16) * 0x100000000 + buf.readUInt32BE(at + 20),
      length: buf.readUInt32BE(at + 24),
    };
    if (request.type === Cmd.WRITE) {
      if (request.length > this.limits.maxRequest) {
        // Drop the payload as it streams in (never buffered), then refuse the write.
        this.skipping = request.length;
        this.skipped = request;
      } else {
        this.pendingWrite = request;
      }
      return;
    }
    this.start(request);
  }

  // ---- running requests -------------------------------------------------------------

  private startWrite(request: Request, payload: Buffer): void {
    this.track(request, payload.length, async () => {
      const refusal = this.checkFlags(request) ?? this.checkWritable();
      if (refusal) return this.replyError(request, refusal[0], refusal[1]);
      await this.negotiated.export.vbd.write(payload, request.offset, { fua: (request.flags & CMD_FLAG_FUA) !== 0 });
      this.replyOk(request);
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
      const reply = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE + length);
      await vbd.read(reply.subarray(SIMPLE_REPLY_SIZE), offset);
      this.writeSimpleHeader(reply, request, 0);
      this.out.send(reply);
      return;
    }
    if (length === 0) return this.out.send(this.chunkHeader(request, REPLY_FLAG_DONE, REPLY_NONE, 0));
    const runs = !df && length >= HOLE_SPLIT_MIN && vbd.capabilities().extents ? await this.readRuns(offset, length) : undefined;
    if (!runs) {
      const chunk = this.dataChunk(request, offset, length);
      await vbd.read(chunk.subarray(CHUNK_HEADER_SIZE + 8), offset);
      chunk.writeUInt16BE(REPLY_FLAG_DONE, 4);
      this.out.send(chunk);
      return;
    }
    // Data runs are read concurrently; holes go out as OFFSET_HOLE without touching data.
    const chunks: Buffer[] = [];
    const failures: Array<{ offset: number; error: unknown }> = [];
    await Promise.all(
      runs.map(async (run) => {
        if (run.type !== 'data') {
          const hole = this.chunkHeader(request, 0, REPLY_OFFSET_HOLE, 12, 12);
          writeU64(hole, run.offset, CHUNK_HEADER_SIZE);
          hole.writeUInt32BE(run.length, CHUNK_HEADER_SIZE + 8);
          chunks.push(hole);
          return;
        }
        const chunk = this.dataChunk(request, run.offset, run.length);
        try {
          await vbd.read(chunk.subarray(CHUNK_HEADER_SIZE + 8), run.offset);
          chunks.push(chunk);
        } catch (error) {
          failures.push({ offset: run.offset, error });
        }
      }),
    );
    for (const failure of failures) {
      const { code, message } = describe(failure.error);
      chunks.push(this.errorChunk(request, REPLY_ERROR_OFFSET, code ? nbdErrorFor(code) : NBD_EIO, message, failure.offset));
    }
    const last = chunks[chunks.length - 1];
    last.writeUInt16BE(REPLY_FLAG_DONE, 4);
    for (const chunk of chunks) this.out.send(chunk);
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
    const payload = 4 + 8 * extents.length;
    const chunk = this.chunkHeader(request, REPLY_FLAG_DONE, REPLY_BLOCK_STATUS, payload, payload);
    chunk.writeUInt32BE(BASE_ALLOCATION_ID, CHUNK_HEADER_SIZE);
    let at = CHUNK_HEADER_SIZE + 4;
    for (const e of extents) {
      chunk.writeUInt32BE(e.length, at);
      chunk.writeUInt32BE(e.type === 'data' ? 0 : e.type === 'zero' ? STATE_ZERO : STATE_HOLE | STATE_ZERO, at + 4);
      at += 8;
    }
    this.out.send(chunk);
  }

  // ---- replies ----------------------------------------------------------------------

  private replyOk(request: Request): void {
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

  /** A chunk header followed by `extra` bytes of room for the payload. */
  private chunkHeader(request: Request, flags: number, type: number, payloadLength: number, extra = 0): Buffer {
    const chunk = Buffer.allocUnsafe(CHUNK_HEADER_SIZE + extra);
    chunk.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
    chunk.writeUInt16BE(flags, 4);
    chunk.writeUInt16BE(type, 6);
    chunk.writeUInt32BE(request.cookieHi, 8);
    chunk.writeUInt32BE(request.cookieLo, 12);
    chunk.writeUInt32BE(payloadLength, 16);
    return chunk;
  }

  /** An OFFSET_DATA chunk whose data area (after header and offset) the read fills in place. */
  private dataChunk(request: Request, offset: number, length: number): Buffer {
    const chunk = this.chunkHeader(request, 0, REPLY_OFFSET_DATA, 8 + length, 8 + length);
    writeU64(chunk, offset, CHUNK_HEADER_SIZE);
    return chunk;
  }

  private errorChunk(request: Request, type: number, error: number, message: string, offset?: number): Buffer {
    const text = Buffer.from(message.slice(0, MAX_MESSAGE), 'utf8');
    const payload = 6 + text.length + (offset === undefined ? 0 : 8);
    const chunk = this.chunkHeader(request, REPLY_FLAG_DONE, type, payload, payload);
    chunk.writeUInt32BE(error, CHUNK_HEADER_SIZE);
    chunk.writeUInt16BE(text.length, CHUNK_HEADER_SIZE + 4);
    text.copy(chunk, CHUNK_HEADER_SIZE + 6);
    if (offset !== undefined) writeU64(chunk, offset, CHUNK_HEADER_SIZE + 6 + text.length);
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

function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / 0x100000000), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}
