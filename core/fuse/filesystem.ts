/**
 * The one-file FUSE file system: a root directory holding one regular file whose bytes
 * are a VBD's. `dispatch` takes one request as read from /dev/fuse and sends at most one
 * reply through the sink; requests run concurrently (the VBD orders overlapping writes).
 *
 * What each opcode does:
 *  - INIT: negotiates the protocol minor, max_write, max_readahead, async reads;
 *  - LOOKUP / GETATTR / SETATTR / STATFS / OPENDIR / READDIR: the root and the file;
 *    SETATTR refuses size changes (EPERM) since a VBD cannot resize;
 *  - OPEN / READ / WRITE / FLUSH / FSYNC / RELEASE: I/O through the VBD; FLUSH flushes
 *    the VBD when that handle wrote something (close-to-open durability), FSYNC always;
 *  - FALLOCATE: punch hole → vbd.trim, zero range → vbd.zero;
 *  - LSEEK: SEEK_DATA / SEEK_HOLE from vbd.extents ('zero' and 'hole' runs both count
 *    as holes: they read as zeros);
 *  - INTERRUPT: noted (a VBD call cannot be cancelled, so the request completes normally);
 *  - FORGET, BATCH_FORGET: no reply; DESTROY: replies, then the session ends;
 *  - anything else: ENOSYS, which the kernel remembers for that opcode.
 */
import { isBlockError } from '../errors';
import type { Vbd } from '../vbd';
import * as P from './protocol';

export const FILE_ID = 2;

/** Where replies go: the /dev/fuse channel, or a test's array. */
export interface ReplySink {
  send(reply: Buffer): void;
  /** True when `send` is done with the buffer once it returns (so it may be reused). */
  readonly copiesReplies?: boolean;
}

export interface OneFileOptions {
  /** The file's name in the mount's root. */
  name: string;
  readOnly: boolean;
  uid: number;
  gid: number;
  /** Largest WRITE the kernel may send (bytes); the read buffers must hold it plus headers. */
  maxWrite: number;
  /** Upper bound on readahead we accept (the kernel's offer may be lower). */
  maxReadahead?: number;
  /** Called once DESTROY was answered. */
  onDestroy?: () => void;
  /** Diagnostics (unexpected failures, interrupted requests). */
  log?: (message: string) => void;
}

interface Handle {
  writable: boolean;
  /** Wrote since the last flush through this handle. */
  dirty: boolean;
}

/** How long the kernel may cache names and attributes, in seconds. The file never changes size. */
const VALIDITY: P.Validity = { seconds: 1 };
const DT_DIR = 4;
const DT_REG = 8;
/** LSEEK scans extents in windows this large, so a huge sparse disk is not mapped in one call. */
const EXTENT_WINDOW = 1 << 30;
/** READ replies at least this large come from a pool (see replyBuffer). */
const LARGE_REPLY = 64 * 1024;
const MAX_POOLED_REPLIES = 32;

export class OneFileFs {
  /** Negotiated protocol minor; 0 until INIT. */
  minor = 0;
  private readonly handles = new Map<number, Handle>();
  private nextHandle = 1;
  private readonly interrupted = new Set<bigint>();
  private readonly running = new Set<bigint>();
  private inFlight = 0;
  private idleWaiters: Array<() => void> = [];
  private readonly created = Date.now();
  private fileAttr: { mode: number; uid: number; gid: number; atime: number; mtime: number; ctime: number };
  private rootAttr: { mode: number; uid: number; gid: number; atime: number; mtime: number; ctime: number };
  private initWaiters: Array<() => void> = [];
  private readonly largeReplies: Buffer[] = [];

  constructor(
    private readonly vbd: Vbd,
    private readonly sink: ReplySink,
    private readonly options: OneFileOptions,
  ) {
    const ro = options.readOnly || vbd.info().readOnly;
    this.options = { ...options, readOnly: ro };
    const t = this.created;
    this.fileAttr = { mode: 0o100000 | (ro ? 0o444 : 0o644), uid: options.uid, gid: options.gid, atime: t, mtime: t, ctime: t };
    this.rootAttr = { mode: 0o040000 | 0o755, uid: options.uid, gid: options.gid, atime: t, mtime: t, ctime: t };
  }

  /** Resolves once INIT has been answered. */
  initialized(): Promise<void> {
    if (this.minor > 0) return Promise.resolve();
    return new Promise((resolve) => this.initWaiters.push(resolve));
  }

  /** Resolves when no request is being served. */
  idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /**
   * Serves one request. `release` is called once the request buffer is no longer needed
   * (a WRITE's data is read from it until the VBD has taken it).
   */
  dispatch(msg: Buffer, release: () => void = () => {}): void {
    let header: P.InHeader;
    try {
      header = P.decodeInHeader(msg);
    } catch (e) {
      // Without a trustworthy header there is no unique to answer; the kernel never sends this.
      this.options.log?.(`dropping a malformed FUSE request: ${(e as Error).message}`);
      release();
      return;
    }
    this.inFlight++;
    this.running.add(header.unique);
    const finish = () => {
      this.running.delete(header.unique);
      this.interrupted.delete(header.unique);
      release();
      if (--this.inFlight === 0) for (const wake of this.idleWaiters.splice(0)) wake();
    };
    let result: Promise<Buffer | null>;
    try {
      result = Promise.resolve(this.handle(header, msg));
    } catch (e) {
      result = Promise.reject(e);
    }
    result.then(
      (reply) => {
        finish();
        if (reply) {
          this.sink.send(reply);
          if (header.opcode === P.Opcode.READ) this.recycle(reply);
        }
      },
      (e) => {
        finish();
        this.sink.send(P.errorReply(header.unique, this.errnoFor(e, header)));
      },
    );
  }

  private errnoFor(e: unknown, header: P.InHeader): number {
    if (isBlockError(e)) return (e as { errno: number }).errno;
    if (e instanceof P.ShortRequestError) {
      this.options.log?.(`${P.OPCODE_NAMES[header.opcode] ?? header.opcode}: ${e.message}`);
      return P.Errno.EINVAL;
    }
    if (e instanceof FuseError) return e.errno;
    this.options.log?.(`${P.OPCODE_NAMES[header.opcode] ?? header.opcode} failed: ${(e as Error)?.stack ?? e}`);
    return P.Errno.EIO;
  }

  /** Returns the reply, or null for requests that get none (FORGET, INTERRUPT). */
  private async handle(h: P.InHeader, msg: Buffer): Promise<Buffer | null> {
    if (this.minor === 0 && h.opcode !== P.Opcode.INIT) throw new FuseError(P.Errno.EIO, 'request before INIT');
    switch (h.opcode) {
      case P.Opcode.INIT:
        return this.init(h, msg);
      case P.Opcode.LOOKUP:
        return this.lookup(h, msg);
      case P.Opcode.FORGET:
      case P.Opcode.BATCH_FORGET:
        return null; // node ids 1 and 2 live as long as the mount
      case P.Opcode.GETATTR:
        return P.encodeAttrOut(h.unique, this.attrOf(h.nodeid), VALIDITY);
      case P.Opcode.SETATTR:
        return this.setattr(h, msg);
      case P.Opcode.OPEN:
        return this.open(h, msg);
      case P.Opcode.READ:
        return this.read(h, msg);
      case P.Opcode.WRITE:
        return this.write(h, msg);
      case P.Opcode.FLUSH:
        return this.flush(h, msg);
      case P.Opcode.FSYNC:
        this.fileOnly(h);
        await this.vbd.flush();
        return P.errorReply(h.unique, 0);
      case P.Opcode.RELEASE:
        this.handles.delete(P.decodeFhIn(msg, 'RELEASE').fh);
        return P.errorReply(h.unique, 0);
      case P.Opcode.FALLOCATE:
        return this.fallocate(h, msg);
      case P.Opcode.LSEEK:
        return this.lseek(h, msg);
      case P.Opcode.STATFS:
        return this.statfs(h);
      case P.Opcode.OPENDIR:
        if (h.nodeid !== P.FUSE_ROOT_ID) throw new FuseError(h.nodeid === FILE_ID ? P.Errno.ENOTDIR : P.Errno.ENOENT);
        return P.encodeOpenOut(h.unique, 0, 0);
      case P.Opcode.READDIR:
        return this.readdir(h, msg);
      case P.Opcode.RELEASEDIR:
      case P.Opcode.FSYNCDIR:
        return P.errorReply(h.unique, 0);
      case P.Opcode.INTERRUPT:
        this.interrupt(msg);
        return null;
      case P.Opcode.DESTROY:
        queueMicrotask(() => this.options.onDestroy?.());
        return P.errorReply(h.unique, 0);
      default:
        throw new FuseError(P.Errno.ENOSYS);
    }
  }

  private init(h: P.InHeader, msg: Buffer): Buffer {
    const kernel = P.decodeInitIn(msg);
    if (kernel.major !== P.FUSE_KERNEL_VERSION || kernel.minor < P.FUSE_MIN_KERNEL_MINOR) {
      throw new FuseError(P.Errno.EPROTO, `kernel FUSE protocol ${kernel.major}.${kernel.minor} is not supported (need 7.${P.FUSE_MIN_KERNEL_MINOR} or newer)`);
    }
    this.minor = Math.min(kernel.minor, P.FUSE_KERNEL_MINOR_VERSION);
    const wanted = P.InitFlag.ASYNC_READ | P.InitFlag.BIG_WRITES | P.InitFlag.ASYNC_DIO | P.InitFlag.MAX_PAGES | P.InitFlag.PARALLEL_DIROPS;
    const reply = P.encodeInitOut(h.unique, {
      major: P.FUSE_KERNEL_VERSION,
      minor: this.minor,
      maxReadahead: Math.min(kernel.maxReadahead, this.options.maxReadahead ?? 1 << 20),
      flags: wanted & kernel.flags,
      maxBackground: 64,
      congestionThreshold: 48,
      maxWrite: this.options.maxWrite,
      timeGran: 1,
      maxPages: Math.ceil(this.options.maxWrite / 4096),
    });
    queueMicrotask(() => {
      for (const wake of this.initWaiters.splice(0)) wake();
    });
    return reply;
  }

  private lookup(h: P.InHeader, msg: Buffer): Buffer {
    const name = P.decodeName(msg);
    if (h.nodeid !== P.FUSE_ROOT_ID || name !== this.options.name) throw new FuseError(P.Errno.ENOENT);
    return P.encodeEntryOut(h.unique, FILE_ID, this.attrOf(FILE_ID), VALIDITY);
  }

  private attrOf(nodeid: number): P.Attr {
    const size = this.vbd.info().size;
    if (nodeid === FILE_ID) {
      return { ino: FILE_ID, size, blocks: Math.ceil(size / 512), nlink: 1, blksize: 4096, ...this.fileAttr };
    }
    if (nodeid === P.FUSE_ROOT_ID) {
      return { ino: P.FUSE_ROOT_ID, size: 0, blocks: 0, nlink: 2, blksize: 4096, ...this.rootAttr };
    }
    throw new FuseError(P.Errno.ENOENT);
  }

  private setattr(h: P.InHeader, msg: Buffer): Buffer {
    const s = P.decodeSetattrIn(msg);
    const attrs = h.nodeid === FILE_ID ? this.fileAttr : h.nodeid === P.FUSE_ROOT_ID ? this.rootAttr : undefined;
    if (!attrs) throw new FuseError(P.Errno.ENOENT);
    if (s.valid & P.FATTR_SIZE) {
      if (h.nodeid !== FILE_ID) throw new FuseError(P.Errno.EISDIR);
      // A VBD has a fixed size: only "truncating" to the current size is accepted.
      if (s.size !== this.vbd.info().size) throw new FuseError(P.Errno.EPERM, 'the disk cannot change size');
    }
    const now = Date.now();
    if (s.valid & P.FATTR_MODE) attrs.mode = (attrs.mode & 0o170000) | (s.mode & 0o7777);
    if (s.valid & P.FATTR_UID) attrs.uid = s.uid;
    if (s.valid & P.FATTR_GID) attrs.gid = s.gid;
    if (s.valid & P.FATTR_ATIME) attrs.atime = s.valid & P.FATTR_ATIME_NOW ? now : s.atime;
    if (s.valid & P.FATTR_MTIME) attrs.mtime = s.valid & P.FATTR_MTIME_NOW ? now : s.mtime;
    attrs.ctime = s.valid & P.FATTR_CTIME ? s.ctime : now;
    return P.encodeAttrOut(h.unique, this.attrOf(h.nodeid), VALIDITY);
  }

  private fileOnly(h: P.InHeader): void {
    if (h.nodeid === P.FUSE_ROOT_ID) throw new FuseError(P.Errno.EISDIR);
    if (h.nodeid !== FILE_ID) throw new FuseError(P.Errno.ENOENT);
  }

  private open(h: P.InHeader, msg: Buffer): Buffer {
    this.fileOnly(h);
    const { flags } = P.decodeOpenIn(msg);
    const writable = (flags & P.O_ACCMODE) !== P.O_RDONLY;
    if (writable && this.options.readOnly) throw new FuseError(P.Errno.EROFS);
    const fh = this.nextHandle++;
    this.handles.set(fh, { writable, dirty: false });
    return P.encodeOpenOut(h.unique, fh, P.FOPEN_PARALLEL_DIRECT_WRITES);
  }

  private async read(h: P.InHeader, msg: Buffer): Promise<Buffer> {
    this.fileOnly(h);
    const r = P.decodeReadIn(msg);
    const size = this.vbd.info().size;
    const n = r.offset >= size ? 0 : Math.min(r.size, size - r.offset);
    // The reply buffer is the VBD's target: the data lands where it is sent from.
    const reply = this.replyBuffer(P.OUT_HEADER_SIZE + n);
    try {
      if (n > 0) await this.vbd.read(reply.subarray(P.OUT_HEADER_SIZE), r.offset);
    } catch (e) {
      this.recycle(reply);
      throw e;
    }
    return P.writeOutHeader(reply, h.unique, 0);
  }

  /**
   * A buffer for a READ reply. Large ones are reused when the sink copies replies at once:
   * a fresh megabyte from malloc is a new mapping, page faults on every touch and an
   * munmap afterwards, which costs more than the data copy itself.
   */
  private replyBuffer(size: number): Buffer {
    if (size < LARGE_REPLY || !this.sink.copiesReplies) return Buffer.allocUnsafe(size);
    const full = this.largeReplies.pop() ?? Buffer.allocUnsafe(P.OUT_HEADER_SIZE + this.options.maxWrite);
    return full.subarray(0, size);
  }

  /** Takes back a large reply buffer once the sink is done with it. */
  private recycle(reply: Buffer): void {
    if (reply.length < LARGE_REPLY || !this.sink.copiesReplies) return;
    const full = Buffer.from(reply.buffer, reply.byteOffset, P.OUT_HEADER_SIZE + this.options.maxWrite);
    if (full.byteOffset === 0 && full.buffer.byteLength === full.length && this.largeReplies.length < MAX_POOLED_REPLIES) this.largeReplies.push(full);
  }

  private async write(h: P.InHeader, msg: Buffer): Promise<Buffer> {
    this.fileOnly(h);
    if (this.options.readOnly) throw new FuseError(P.Errno.EROFS);
    const w = P.decodeWriteIn(msg, this.minor);
    const size = this.vbd.info().size;
    // The file cannot grow: a write at or past the end fails, one across it is cut short.
    if (w.offset >= size && w.size > 0) throw new FuseError(P.Errno.EFBIG);
    const n = Math.min(w.size, size - w.offset);
    if (n > 0) await this.vbd.write(w.data.subarray(0, n), w.offset);
    const handle = this.handles.get(w.fh);
    if (handle) handle.dirty = true;
    this.fileAttr.mtime = this.fileAttr.ctime = Date.now();
    return P.encodeWriteOut(h.unique, n);
  }

  private async flush(h: P.InHeader, msg: Buffer): Promise<Buffer> {
    const handle = this.handles.get(P.decodeFhIn(msg, 'FLUSH').fh);
    if (handle?.dirty) {
      handle.dirty = false;
      await this.vbd.flush();
    }
    return P.errorReply(h.unique, 0);
  }

  private async fallocate(h: P.InHeader, msg: Buffer): Promise<Buffer> {
    this.fileOnly(h);
    const f = P.decodeFallocateIn(msg);
    if (this.options.readOnly) throw new FuseError(P.Errno.EROFS);
    const known = P.FALLOC_FL_KEEP_SIZE | P.FALLOC_FL_PUNCH_HOLE | P.FALLOC_FL_ZERO_RANGE;
    const op = f.mode & ~P.FALLOC_FL_KEEP_SIZE;
    if (f.mode & ~known || (op !== P.FALLOC_FL_PUNCH_HOLE && op !== P.FALLOC_FL_ZERO_RANGE)) {
      // Plain allocation (mode 0) has no meaning for a fixed-size disk; callers fall back.
      throw new FuseError(P.Errno.EOPNOTSUPP);
    }
    const size = this.vbd.info().size;
    const end = f.offset + f.length;
    if (!(f.mode & P.FALLOC_FL_KEEP_SIZE) && end > size) throw new FuseError(P.Errno.EFBIG);
    const stop = Math.min(end, size);
    if (stop > f.offset) {
      if (op === P.FALLOC_FL_PUNCH_HOLE) await this.vbd.trim(f.offset, stop - f.offset);
      else await this.vbd.zero(f.offset, stop - f.offset, { mayTrim: false });
    }
    return P.errorReply(h.unique, 0);
  }

  private async lseek(h: P.InHeader, msg: Buffer): Promise<Buffer> {
    this.fileOnly(h);
    const l = P.decodeLseekIn(msg);
    if (l.whence !== P.SEEK_DATA && l.whence !== P.SEEK_HOLE) throw new FuseError(P.Errno.EINVAL);
    const size = this.vbd.info().size;
    if (l.offset >= size) throw new FuseError(P.Errno.ENXIO);
    for (let at = l.offset; at < size; ) {
      const window = Math.min(EXTENT_WINDOW, size - at);
      const runs = await this.vbd.extents(at, window);
      for (const run of runs) {
        const isData = run.type === 'data';
        if (isData === (l.whence === P.SEEK_DATA)) return P.encodeLseekOut(h.unique, Math.max(run.offset, l.offset));
      }
      at += window;
    }
    // No data after offset: ENXIO. No hole before the end: the end of the file is one.
    if (l.whence === P.SEEK_DATA) throw new FuseError(P.Errno.ENXIO);
    return P.encodeLseekOut(h.unique, size);
  }

  private statfs(h: P.InHeader): Buffer {
    const size = this.vbd.info().size;
    return P.encodeStatfsOut(h.unique, { blocks: Math.ceil(size / 4096), bfree: 0, bavail: 0, files: 2, ffree: 0, bsize: 4096, namelen: 255, frsize: 4096 });
  }

  private readdir(h: P.InHeader, msg: Buffer): Buffer {
    if (h.nodeid !== P.FUSE_ROOT_ID) throw new FuseError(P.Errno.ENOENT);
    const r = P.decodeReaddirIn(msg);
    const entries: P.Dirent[] = [
      { ino: P.FUSE_ROOT_ID, name: '.', type: DT_DIR },
      { ino: P.FUSE_ROOT_ID, name: '..', type: DT_DIR },
      { ino: FILE_ID, name: this.options.name, type: DT_REG },
    ];
    return P.encodeDirents(h.unique, entries, r.offset, r.size);
  }

  private interrupt(msg: Buffer): void {
    const { unique } = P.decodeInterruptIn(msg);
    // The VBD call cannot be withdrawn; the request finishes and is answered as usual
    // (the kernel accepts a late reply). An unknown unique has already been answered.
    if (this.running.has(unique)) this.interrupted.add(unique);
  }
}

/** A failure that is already a FUSE errno. */
export class FuseError extends Error {
  constructor(
    readonly errno: number,
    message?: string,
  ) {
    super(message ?? `FUSE error ${errno}`);
  }
}
