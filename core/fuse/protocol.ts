/**
 * The FUSE wire protocol as the Linux kernel speaks it on /dev/fuse (linux/fuse.h,
 * protocol 7.x): opcodes, flags, and the few structures the one-file export reads and
 * writes. Everything is little-endian host order on x86/arm; offsets below are the C
 * layouts, which are padded to 8 bytes so they are the same for 32- and 64-bit builds.
 */

export const FUSE_KERNEL_VERSION = 7;
/** The newest minor we speak; we answer min(kernel's, ours). 7.38 is what linux/fuse.h here describes. */
export const FUSE_KERNEL_MINOR_VERSION = 38;
/** Oldest kernel minor we accept (max_pages, parallel direct writes and lseek are newer, but optional). */
export const FUSE_MIN_KERNEL_MINOR = 23;

export const FUSE_ROOT_ID = 1;

export const Opcode = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  GETXATTR: 22,
  LISTXATTR: 23,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  FSYNCDIR: 30,
  ACCESS: 34,
  INTERRUPT: 36,
  DESTROY: 38,
  BATCH_FORGET: 42,
  FALLOCATE: 43,
  LSEEK: 46,
} as const;

/** fuse_init_in/out flags (the low 32 bits). */
export const InitFlag = {
  ASYNC_READ: 1 << 0,
  BIG_WRITES: 1 << 5,
  ASYNC_DIO: 1 << 15,
  PARALLEL_DIROPS: 1 << 18,
  MAX_PAGES: 1 << 22,
} as const;

/** fuse_open_out.open_flags. */
export const FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6;

/** fuse_setattr_in.valid bits. */
export const FATTR_MODE = 1 << 0;
export const FATTR_UID = 1 << 1;
export const FATTR_GID = 1 << 2;
export const FATTR_SIZE = 1 << 3;
export const FATTR_ATIME = 1 << 4;
export const FATTR_MTIME = 1 << 5;
export const FATTR_ATIME_NOW = 1 << 7;
export const FATTR_MTIME_NOW = 1 << 8;
export const FATTR_CTIME = 1 << 10;

/** fallocate(2) modes the kernel forwards. */
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

/** open(2) access mode bits carried in fuse_open_in.flags. */
export const O_ACCMODE = 0o3;
export const O_RDONLY = 0;

/** Linux errno numbers the export answers with that BlockError does not name. */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  ENXIO: 6,
  EBADF: 9,
  EACCES: 13,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  EFBIG: 27,
  EROFS: 30,
  ENOSYS: 38,
  ENODATA: 61,
  EPROTO: 71,
  EOPNOTSUPP: 95,
} as const;

export const IN_HEADER_SIZE = 40;
export const OUT_HEADER_SIZE = 16;
/** fuse_write_in, which sits between the in-header and a WRITE's data. */
export const WRITE_IN_SIZE = 40;
/** The kernel wants read buffers at least this large, whatever max_write is. */
export const FUSE_MIN_READ_BUFFER = 8192;

export const ATTR_SIZE = 88;
export const ENTRY_OUT_SIZE = 40 + ATTR_SIZE;
export const ATTR_OUT_SIZE = 16 + ATTR_SIZE;
export const INIT_OUT_SIZE = 64;
export const OPEN_OUT_SIZE = 16;
export const WRITE_OUT_SIZE = 8;
export const STATFS_OUT_SIZE = 80;
export const LSEEK_OUT_SIZE = 8;

/** fuse_in_header, decoded. */
export interface InHeader {
  len: number;
  opcode: number;
  unique: bigint;
  nodeid: number;
  uid: number;
  gid: number;
  pid: number;
}

/** A request too short for what its opcode needs (a kernel/userspace mismatch, or a test's garbage). */
export class ShortRequestError extends Error {}

/** Decodes the header and checks that the message is as long as it says. */
export function decodeInHeader(msg: Buffer): InHeader {
  if (msg.length < IN_HEADER_SIZE) throw new ShortRequestError(`FUSE request of ${msg.length} bytes is shorter than its header`);
  const len = msg.readUInt32LE(0);
  if (len !== msg.length) throw new ShortRequestError(`FUSE request says ${len} bytes but ${msg.length} arrived`);
  return {
    len,
    opcode: msg.readUInt32LE(4),
    unique: msg.readBigUInt64LE(8),
    nodeid: u64(msg, 16),
    uid: msg.readUInt32LE(24),
    gid: msg.readUInt32LE(28),
    pid: msg.readUInt32LE(32),
  };
}

/** A u64 as a number; values past 2^53 (never valid offsets or node ids here) saturate. */
export function u64(buf: Buffer, at: number): number {
  const v = buf.readBigUInt64LE(at);
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER + 1 : Number(v);
}

/** The opcode-specific body of a request, checked to be at least `size` bytes. */
export function body(msg: Buffer, size: number, what: string): Buffer {
  const b = msg.subarray(IN_HEADER_SIZE);
  if (b.length < size) throw new ShortRequestError(`${what} body of ${b.length} bytes, expected ${size}`);
  return b;
}

/** Writes fuse_out_header at the start of `reply`; `error` is 0 or a negative errno. */
export function writeOutHeader(reply: Buffer, unique: bigint, error: number): Buffer {
  reply.writeUInt32LE(reply.length, 0);
  reply.writeInt32LE(error, 4);
  reply.writeBigUInt64LE(unique, 8);
  return reply;
}

/** A reply with only a header: success without data, or an error. */
export function errorReply(unique: bigint, errno: number): Buffer {
  return writeOutHeader(Buffer.alloc(OUT_HEADER_SIZE), unique, errno === 0 ? 0 : -Math.abs(errno));
}

export interface Attr {
  ino: number;
  size: number;
  blocks: number;
  atime: number;
  mtime: number;
  ctime: number;
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  blksize: number;
}

/** struct fuse_attr at `at`. Times are milliseconds since the epoch. */
export function writeAttr(buf: Buffer, at: number, a: Attr): void {
  buf.writeBigUInt64LE(BigInt(a.ino), at);
  buf.writeBigUInt64LE(BigInt(a.size), at + 8);
  buf.writeBigUInt64LE(BigInt(a.blocks), at + 16);
  const seconds = (ms: number) => BigInt(Math.floor(ms / 1000));
  const nanos = (ms: number) => Math.floor((ms % 1000) * 1e6);
  buf.writeBigUInt64LE(seconds(a.atime), at + 24);
  buf.writeBigUInt64LE(seconds(a.mtime), at + 32);
  buf.writeBigUInt64LE(seconds(a.ctime), at + 40);
  buf.writeUInt32LE(nanos(a.atime), at + 48);
  buf.writeUInt32LE(nanos(a.mtime), at + 52);
  buf.writeUInt32LE(nanos(a.ctime), at + 56);
  buf.writeUInt32LE(a.mode, at + 60);
  buf.writeUInt32LE(a.nlink, at + 64);
  buf.writeUInt32LE(a.uid, at + 68);
  buf.writeUInt32LE(a.gid, at + 72);
  buf.writeUInt32LE(0, at + 76); // rdev
  buf.writeUInt32LE(a.blksize, at + 80);
  buf.writeUInt32LE(0, at + 84); // flags
}

/** A successful reply of `size` body bytes, header filled, body zeroed. */
export function replyBuffer(unique: bigint, size: number): Buffer {
  return writeOutHeader(Buffer.alloc(OUT_HEADER_SIZE + size), unique, 0);
}

export interface InitIn {
  major: number;
  minor: number;
  maxReadahead: number;
  flags: number;
}

export function decodeInitIn(msg: Buffer): InitIn {
  const b = body(msg, 16, 'INIT');
  return { major: b.readUInt32LE(0), minor: b.readUInt32LE(4), maxReadahead: b.readUInt32LE(8), flags: b.readUInt32LE(12) };
}

export interface InitOut {
  major: number;
  minor: number;
  maxReadahead: number;
  flags: number;
  maxBackground: number;
  congestionThreshold: number;
  maxWrite: number;
  timeGran: number;
  maxPages: number;
}

export function encodeInitOut(unique: bigint, o: InitOut): Buffer {
  const r = replyBuffer(unique, INIT_OUT_SIZE);
  const b = OUT_HEADER_SIZE;
  r.writeUInt32LE(o.major, b);
  r.writeUInt32LE(o.minor, b + 4);
  r.writeUInt32LE(o.maxReadahead, b + 8);
  r.writeUInt32LE(o.flags >>> 0, b + 12);
  r.writeUInt16LE(o.maxBackground, b + 16);
  r.writeUInt16LE(o.congestionThreshold, b + 18);
  r.writeUInt32LE(o.maxWrite, b + 20);
  r.writeUInt32LE(o.timeGran, b + 24);
  r.writeUInt16LE(o.maxPages, b + 28);
  return r;
}

/** Seconds (and nanoseconds) a reply lets the kernel cache names and attributes. */
export interface Validity {
  seconds: number;
}

export function encodeEntryOut(unique: bigint, nodeid: number, attr: Attr, valid: Validity): Buffer {
  const r = replyBuffer(unique, ENTRY_OUT_SIZE);
  const b = OUT_HEADER_SIZE;
  r.writeBigUInt64LE(BigInt(nodeid), b);
  r.writeBigUInt64LE(0n, b + 8); // generation
  r.writeBigUInt64LE(BigInt(valid.seconds), b + 16); // entry_valid
  r.writeBigUInt64LE(BigInt(valid.seconds), b + 24); // attr_valid
  writeAttr(r, b + 40, attr);
  return r;
}

export function encodeAttrOut(unique: bigint, attr: Attr, valid: Validity): Buffer {
  const r = replyBuffer(unique, ATTR_OUT_SIZE);
  r.writeBigUInt64LE(BigInt(valid.seconds), OUT_HEADER_SIZE);
  writeAttr(r, OUT_HEADER_SIZE + 16, attr);
  return r;
}

export interface SetattrIn {
  valid: number;
  size: number;
  atime: number;
  mtime: number;
  ctime: number;
  mode: number;
  uid: number;
  gid: number;
}

export function decodeSetattrIn(msg: Buffer): SetattrIn {
  const b = body(msg, 88, 'SETATTR');
  const ms = (secAt: number, nsecAt: number) => u64(b, secAt) * 1000 + Math.floor(b.readUInt32LE(nsecAt) / 1e6);
  return {
    valid: b.readUInt32LE(0),
    size: u64(b, 16),
    atime: ms(32, 56),
    mtime: ms(40, 60),
    ctime: ms(48, 64),
    mode: b.readUInt32LE(68),
    uid: b.readUInt32LE(76),
    gid: b.readUInt32LE(80),
  };
}

export function decodeOpenIn(msg: Buffer): { flags: number } {
  return { flags: body(msg, 8, 'OPEN').readUInt32LE(0) };
}

export function encodeOpenOut(unique: bigint, fh: number, openFlags: number): Buffer {
  const r = replyBuffer(unique, OPEN_OUT_SIZE);
  r.writeBigUInt64LE(BigInt(fh), OUT_HEADER_SIZE);
  r.writeUInt32LE(openFlags, OUT_HEADER_SIZE + 8);
  return r;
}

export interface IoIn {
  fh: number;
  offset: number;
  size: number;
}

export function decodeReadIn(msg: Buffer): IoIn {
  const b = body(msg, 24, 'READ');
  return { fh: u64(b, 0), offset: u64(b, 8), size: b.readUInt32LE(16) };
}

/** fuse_write_in and the data after it (a view into the request buffer, not a copy). */
export function decodeWriteIn(msg: Buffer, minor: number): IoIn & { data: Buffer } {
  // Kernels before 7.9 sent a 24-byte fuse_write_in; every kernel we accept sends 40.
  const headerSize = minor < 9 ? 24 : WRITE_IN_SIZE;
  const b = body(msg, headerSize, 'WRITE');
  const size = b.readUInt32LE(16);
  const data = b.subarray(headerSize, headerSize + size);
  if (data.length !== size) throw new ShortRequestError(`WRITE of ${size} bytes carries ${data.length}`);
  return { fh: u64(b, 0), offset: u64(b, 8), size, data };
}

export function encodeWriteOut(unique: bigint, size: number): Buffer {
  const r = replyBuffer(unique, WRITE_OUT_SIZE);
  r.writeUInt32LE(size, OUT_HEADER_SIZE);
  return r;
}

export function decodeFhIn(msg: Buffer, what: string): { fh: number } {
  return { fh: u64(body(msg, 8, what), 0) };
}

export function decodeFsyncIn(msg: Buffer): { fh: number; flags: number } {
  const b = body(msg, 16, 'FSYNC');
  return { fh: u64(b, 0), flags: b.readUInt32LE(8) };
}

export function decodeFallocateIn(msg: Buffer): { fh: number; offset: number; length: number; mode: number } {
  const b = body(msg, 32, 'FALLOCATE');
  return { fh: u64(b, 0), offset: u64(b, 8), length: u64(b, 16), mode: b.readUInt32LE(24) };
}

export function decodeLseekIn(msg: Buffer): { fh: number; offset: number; whence: number } {
  const b = body(msg, 24, 'LSEEK');
  return { fh: u64(b, 0), offset: u64(b, 8), whence: b.readUInt32LE(16) };
}

export function encodeLseekOut(unique: bigint, offset: number): Buffer {
  const r = replyBuffer(unique, LSEEK_OUT_SIZE);
  r.writeBigUInt64LE(BigInt(offset), OUT_HEADER_SIZE);
  return r;
}

export function decodeInterruptIn(msg: Buffer): { unique: bigint } {
  return { unique: body(msg, 8, 'INTERRUPT').readBigUInt64LE(0) };
}

export function decodeReaddirIn(msg: Buffer): { fh: number; offset: number; size: number } {
  const b = body(msg, 24, 'READDIR');
  return { fh: u64(b, 0), offset: u64(b, 8), size: b.readUInt32LE(16) };
}

/** The NUL-terminated name of a LOOKUP. */
export function decodeName(msg: Buffer): string {
  const b = msg.subarray(IN_HEADER_SIZE);
  const end = b.indexOf(0);
  return b.subarray(0, end < 0 ? b.length : end).toString('utf8');
}

export interface Statfs {
  blocks: number;
  bfree: number;
  bavail: number;
  files: number;
  ffree: number;
  bsize: number;
  namelen: number;
  frsize: number;
}

export function encodeStatfsOut(unique: bigint, s: Statfs): Buffer {
  const r = replyBuffer(unique, STATFS_OUT_SIZE);
  const b = OUT_HEADER_SIZE;
  r.writeBigUInt64LE(BigInt(s.blocks), b);
  r.writeBigUInt64LE(BigInt(s.bfree), b + 8);
  r.writeBigUInt64LE(BigInt(s.bavail), b + 16);
  r.writeBigUInt64LE(BigInt(s.files), b + 24);
  r.writeBigUInt64LE(BigInt(s.ffree), b + 32);
  r.writeUInt32LE(s.bsize, b + 40);
  r.writeUInt32LE(s.namelen, b + 44);
  r.writeUInt32LE(s.frsize, b + 48);
  return r;
}

export interface Dirent {
  ino: number;
  name: string;
  /** DT_* type: 4 directory, 8 regular file. */
  type: number;
}

/**
 * Directory entries from index `offset` on, as many as fit in `size` bytes. Each
 * fuse_dirent's `off` is the index of the next entry, so the kernel resumes there.
 */
export function encodeDirents(unique: bigint, entries: Dirent[], offset: number, size: number): Buffer {
  const parts: Buffer[] = [];
  let used = 0;
  for (let i = offset; i < entries.length; i++) {
    const name = Buffer.from(entries[i].name, 'utf8');
    const recLen = (24 + name.length + 7) & ~7;
    if (used + recLen > size) break;
    const rec = Buffer.alloc(recLen);
    rec.writeBigUInt64LE(BigInt(entries[i].ino), 0);
    rec.writeBigUInt64LE(BigInt(i + 1), 8);
    rec.writeUInt32LE(name.length, 16);
    rec.writeUInt32LE(entries[i].type, 20);
    name.copy(rec, 24);
    parts.push(rec);
    used += recLen;
  }
  const r = replyBuffer(unique, used);
  Buffer.concat(parts).copy(r, OUT_HEADER_SIZE);
  return r;
}

export const OPCODE_NAMES: Record<number, string> = Object.fromEntries(Object.entries(Opcode).map(([name, n]) => [n, name]));
