/**
 * The FUSE dispatcher without the kernel: requests built byte by byte as linux/fuse.h
 * lays them out, replies decoded the same way. Covers what the kernel rarely or never
 * sends on its own (unknown opcodes, old protocol versions, truncated bodies).
 */
import test from 'ava';
import * as fc from 'fast-check';
import 'reflect-metadata';
import '../providers';
import { Opener } from '../core/open';
import { Vbd } from '../core/vbd';
import { OneFileFs, FILE_ID } from '../core/fuse/filesystem';
import * as P from '../core/fuse/protocol';

const ENOSYS = 38;

interface Reply {
  len: number;
  error: number;
  unique: bigint;
  body: Buffer;
}

function decodeReply(r: Buffer): Reply {
  return { len: r.readUInt32LE(0), error: r.readInt32LE(4), unique: r.readBigUInt64LE(8), body: r.subarray(16) };
}

let nextUnique = 100n;

function request(opcode: number, nodeid: number, body: Buffer = Buffer.alloc(0)): { msg: Buffer; unique: bigint } {
  const unique = nextUnique++;
  const msg = Buffer.alloc(P.IN_HEADER_SIZE + body.length);
  msg.writeUInt32LE(msg.length, 0);
  msg.writeUInt32LE(opcode, 4);
  msg.writeBigUInt64LE(unique, 8);
  msg.writeBigUInt64LE(BigInt(nodeid), 16);
  body.copy(msg, P.IN_HEADER_SIZE);
  return { msg, unique };
}

function initBody(major: number, minor: number, maxReadahead: number, flags: number): Buffer {
  const b = Buffer.alloc(64);
  b.writeUInt32LE(major, 0);
  b.writeUInt32LE(minor, 4);
  b.writeUInt32LE(maxReadahead, 8);
  b.writeUInt32LE(flags >>> 0, 12);
  return b;
}

function ioBody(fh: number, offset: number, size: number, data?: Buffer): Buffer {
  const b = Buffer.alloc(40 + (data?.length ?? 0));
  b.writeBigUInt64LE(BigInt(fh), 0);
  b.writeBigUInt64LE(BigInt(offset), 8);
  b.writeUInt32LE(size, 16);
  data?.copy(b, 40);
  return b;
}

async function setup(spec = 'memory:1M', options: { readOnly?: boolean; init?: boolean } = {}) {
  const vbd = new Vbd(await new Opener({ readOnly: options.readOnly }).open(spec), { readOnly: options.readOnly });
  const replies: Buffer[] = [];
  const fs = new OneFileFs(vbd, { send: (r) => replies.push(r) }, { name: 'disk', readOnly: !!options.readOnly, uid: 0, gid: 0, maxWrite: 1 << 20 });
  /** Sends one request and returns its reply (or undefined when it gets none). */
  const call = async (opcode: number, nodeid: number, body?: Buffer): Promise<Reply | undefined> => {
    const { msg, unique } = request(opcode, nodeid, body);
    const before = replies.length;
    fs.dispatch(msg);
    await fs.idle();
    await new Promise((r) => setImmediate(r));
    const mine = replies.slice(before).map(decodeReply).filter((r) => r.unique === unique);
    return mine[0];
  };
  if (options.init !== false) {
    const r = await call(P.Opcode.INIT, 0, initBody(7, 41, 128 * 1024, 0xffffffff));
    if (r?.error !== 0) throw new Error('INIT failed');
  }
  return { vbd, fs, call, replies };
}

test('INIT negotiates the minor, max_write, readahead and only flags the kernel offered', async (t) => {
  const { call, fs } = await setup('memory:1M', { init: false });
  const r = (await call(P.Opcode.INIT, 0, initBody(7, 41, 64 * 1024, P.InitFlag.ASYNC_READ | P.InitFlag.MAX_PAGES)))!;
  t.is(r.error, 0);
  t.is(r.len, 16 + P.INIT_OUT_SIZE);
  t.is(r.body.readUInt32LE(0), 7);
  t.is(r.body.readUInt32LE(4), P.FUSE_KERNEL_MINOR_VERSION);
  t.is(r.body.readUInt32LE(8), 64 * 1024, 'max_readahead never above what the kernel offered');
  t.is(r.body.readUInt32LE(12), P.InitFlag.ASYNC_READ | P.InitFlag.MAX_PAGES);
  t.is(r.body.readUInt32LE(20), 1 << 20, 'max_write');
  t.is(r.body.readUInt16LE(28), 256, 'max_pages');
  t.is(fs.minor, P.FUSE_KERNEL_MINOR_VERSION);

  const older = await setup('memory:1M', { init: false });
  const r2 = (await older.call(P.Opcode.INIT, 0, initBody(7, 31, 1 << 20, 0)))!;
  t.is(r2.body.readUInt32LE(4), 31, 'an older kernel gets its own minor back');
});

test('INIT from an unsupported protocol is refused, and nothing is served before INIT', async (t) => {
  const { call } = await setup('memory:1M', { init: false });
  t.is((await call(P.Opcode.GETATTR, 1, Buffer.alloc(16)))!.error, -5);
  t.is((await call(P.Opcode.INIT, 0, initBody(7, 12, 0, 0)))!.error, -71);
  t.is((await call(P.Opcode.INIT, 0, initBody(8, 0, 0, 0)))!.error, -71);
});

test('unknown and unimplemented opcodes get ENOSYS', async (t) => {
  const { call } = await setup();
  for (const opcode of [9 /* MKDIR */, 10 /* UNLINK */, 35 /* CREATE */, 39 /* IOCTL */, 47 /* COPY_FILE_RANGE */, 4242, 0xffffffff]) {
    const r = await call(opcode, 1, Buffer.alloc(64));
    t.is(r?.error, -ENOSYS, `opcode ${opcode}`);
  }
});

test('LOOKUP, GETATTR and READDIR show one regular file of the disk size', async (t) => {
  const { call } = await setup('memory:3M');
  const entry = (await call(P.Opcode.LOOKUP, 1, Buffer.from('disk\0')))!;
  t.is(entry.error, 0);
  t.is(Number(entry.body.readBigUInt64LE(0)), FILE_ID);
  t.is(Number(entry.body.readBigUInt64LE(40 + 8)), 3 * 2 ** 20, 'size');
  t.is(entry.body.readUInt32LE(40 + 60) & 0o170000, 0o100000, 'regular file');
  t.is((await call(P.Opcode.LOOKUP, 1, Buffer.from('other\0')))!.error, -2);
  const attr = (await call(P.Opcode.GETATTR, 1, Buffer.alloc(16)))!;
  t.is(attr.body.readUInt32LE(16 + 60) & 0o170000, 0o040000, 'root is a directory');
  t.is((await call(P.Opcode.GETATTR, 7, Buffer.alloc(16)))!.error, -2);
  const dir = (await call(P.Opcode.READDIR, 1, ioBody(0, 0, 4096)))!;
  const names: string[] = [];
  for (let at = 0; at < dir.body.length; ) {
    const len = dir.body.readUInt32LE(at + 16);
    names.push(dir.body.subarray(at + 24, at + 24 + len).toString());
    at += (24 + len + 7) & ~7;
  }
  t.deepEqual(names, ['.', '..', 'disk']);
});

test('WRITE and READ go through the VBD; the file cannot grow', async (t) => {
  const { call, vbd } = await setup('memory:1M');
  const open = (await call(P.Opcode.OPEN, FILE_ID, Buffer.from([2, 0, 0, 0, 0, 0, 0, 0])))!;
  t.is(open.error, 0);
  const fh = Number(open.body.readBigUInt64LE(0));
  const data = Buffer.from('hello, block device');
  const w = (await call(P.Opcode.WRITE, FILE_ID, ioBody(fh, 4096, data.length, data)))!;
  t.is(w.error, 0);
  t.is(w.body.readUInt32LE(0), data.length);
  const check = Buffer.alloc(data.length);
  await vbd.read(check, 4096);
  t.deepEqual(check, data);
  const r = (await call(P.Opcode.READ, FILE_ID, ioBody(fh, 4096, data.length)))!;
  t.deepEqual(r.body, data);
  // Across the end: cut short; at the end: EFBIG; reads past the end are empty.
  const tail = (await call(P.Opcode.WRITE, FILE_ID, ioBody(fh, 2 ** 20 - 4, 8, Buffer.alloc(8, 1))))!;
  t.is(tail.body.readUInt32LE(0), 4);
  t.is((await call(P.Opcode.WRITE, FILE_ID, ioBody(fh, 2 ** 20, 8, Buffer.alloc(8, 1))))!.error, -27);
  t.is((await call(P.Opcode.READ, FILE_ID, ioBody(fh, 2 ** 20, 4096)))!.body.length, 0);
  t.is((await call(P.Opcode.READ, FILE_ID, ioBody(fh, 2 ** 20 - 10, 4096)))!.body.length, 10);
  t.is((await call(P.Opcode.FSYNC, FILE_ID, Buffer.alloc(16)))!.error, 0);
  t.is((await call(P.Opcode.FLUSH, FILE_ID, ioBody(fh, 0, 0)))!.error, 0);
  t.is((await call(P.Opcode.RELEASE, FILE_ID, ioBody(fh, 0, 0)))!.error, 0);
});

test('SETATTR refuses size changes but accepts the current size and mode changes', async (t) => {
  const { call } = await setup('memory:1M');
  const setattr = (valid: number, size: number, mode = 0) => {
    const b = Buffer.alloc(88);
    b.writeUInt32LE(valid, 0);
    b.writeBigUInt64LE(BigInt(size), 16);
    b.writeUInt32LE(mode, 68);
    return b;
  };
  t.is((await call(P.Opcode.SETATTR, FILE_ID, setattr(P.FATTR_SIZE, 0)))!.error, -1);
  t.is((await call(P.Opcode.SETATTR, FILE_ID, setattr(P.FATTR_SIZE, 2 ** 21)))!.error, -1);
  t.is((await call(P.Opcode.SETATTR, FILE_ID, setattr(P.FATTR_SIZE, 2 ** 20)))!.error, 0);
  const chmod = (await call(P.Opcode.SETATTR, FILE_ID, setattr(P.FATTR_MODE, 0, 0o600)))!;
  t.is(chmod.error, 0);
  t.is(chmod.body.readUInt32LE(16 + 60), 0o100600);
});

test('provider errors become their errno; read-only refuses writes with EROFS', async (t) => {
  const limited = await setup('memory,limit=64K:1M');
  const big = Buffer.alloc(128 * 1024, 7);
  t.is((await limited.call(P.Opcode.WRITE, FILE_ID, ioBody(1, 0, big.length, big)))!.error, -28, 'ENOSPC');

  const ro = await setup('memory:1M', { readOnly: true });
  t.is((await ro.call(P.Opcode.OPEN, FILE_ID, Buffer.from([1, 0, 0, 0, 0, 0, 0, 0])))!.error, -30);
  t.is((await ro.call(P.Opcode.OPEN, FILE_ID, Buffer.from([0, 0, 0, 0, 0, 0, 0, 0])))!.error, 0);
  t.is((await ro.call(P.Opcode.WRITE, FILE_ID, ioBody(1, 0, 4, Buffer.alloc(4))))!.error, -30);
  const fallocate = Buffer.alloc(32);
  fallocate.writeUInt32LE(P.FALLOC_FL_PUNCH_HOLE | P.FALLOC_FL_KEEP_SIZE, 24);
  t.is((await ro.call(P.Opcode.FALLOCATE, FILE_ID, fallocate))!.error, -30);
});

test('FALLOCATE punches holes and zeroes ranges; LSEEK finds data and holes from extents', async (t) => {
  const { call, vbd } = await setup('memory:4M');
  await vbd.write(Buffer.alloc(256 * 1024, 0xaa), 1 << 20);
  const lseek = async (offset: number, whence: number) => {
    const b = Buffer.alloc(24);
    b.writeBigUInt64LE(BigInt(offset), 8);
    b.writeUInt32LE(whence, 16);
    const r = (await call(P.Opcode.LSEEK, FILE_ID, b))!;
    return r.error !== 0 ? r.error : Number(r.body.readBigUInt64LE(0));
  };
  t.is(await lseek(0, P.SEEK_DATA), 1 << 20);
  t.is(await lseek(1 << 20, P.SEEK_HOLE), (1 << 20) + 256 * 1024);
  t.is(await lseek((1 << 20) + 4096, P.SEEK_DATA), (1 << 20) + 4096);
  t.is(await lseek(2 << 20, P.SEEK_DATA), -6, 'ENXIO: no data after');
  t.is(await lseek(3 << 20, P.SEEK_HOLE), 3 << 20);
  t.is(await lseek(4 << 20, P.SEEK_HOLE), -6, 'ENXIO at the end');
  t.is(await lseek(0, 0 /* SEEK_SET */), -22);

  const fallocate = (mode: number, offset: number, length: number) => {
    const b = Buffer.alloc(32);
    b.writeBigUInt64LE(BigInt(offset), 8);
    b.writeBigUInt64LE(BigInt(length), 16);
    b.writeUInt32LE(mode, 24);
    return call(P.Opcode.FALLOCATE, FILE_ID, b);
  };
  t.is((await fallocate(P.FALLOC_FL_PUNCH_HOLE | P.FALLOC_FL_KEEP_SIZE, 1 << 20, 128 * 1024))!.error, 0);
  t.is(await lseek(0, P.SEEK_DATA), (1 << 20) + 128 * 1024, 'the punched range is a hole');
  t.is((await fallocate(P.FALLOC_FL_ZERO_RANGE | P.FALLOC_FL_KEEP_SIZE, (1 << 20) + 128 * 1024, 4096))!.error, 0);
  const check = Buffer.alloc(4096, 1);
  await vbd.read(check, (1 << 20) + 128 * 1024);
  t.true(check.every((b) => b === 0));
  t.is((await fallocate(0, 0, 4096))!.error, -95, 'plain allocation is not supported');
  t.is((await fallocate(P.FALLOC_FL_ZERO_RANGE, 4 << 20, 4096))!.error, -27, 'would grow the file');
});

test('FORGET and INTERRUPT get no reply; DESTROY does', async (t) => {
  const { call } = await setup();
  t.is(await call(P.Opcode.FORGET, FILE_ID, Buffer.alloc(8)), undefined);
  t.is(await call(P.Opcode.INTERRUPT, 0, Buffer.alloc(8)), undefined);
  t.is((await call(P.Opcode.DESTROY, 0))!.error, 0);
});

test('truncated bodies are answered EINVAL, and garbage never breaks the dispatcher', async (t) => {
  const { call, fs, replies } = await setup();
  t.is((await call(P.Opcode.READ, FILE_ID, Buffer.alloc(8)))!.error, -22);
  t.is((await call(P.Opcode.WRITE, FILE_ID, ioBody(1, 0, 100, Buffer.alloc(10))))!.error, -22);
  await fc.assert(
    fc.asyncProperty(fc.integer({ min: 0, max: 60 }), fc.nat(), fc.uint8Array({ maxLength: 200 }), async (opcode, nodeid, raw) => {
      const { msg, unique } = request(opcode, nodeid % 4, Buffer.from(raw));
      const before = replies.length;
      fs.dispatch(msg);
      await fs.idle();
      await new Promise((r) => setImmediate(r));
      const mine = replies.slice(before).map(decodeReply);
      // At most one reply, to this request, with a header that tells its own length.
      return mine.length <= 1 && mine.every((r) => r.unique === unique && r.len === 16 + r.body.length && r.error <= 0);
    }),
    { numRuns: 300 },
  );
  // A message whose length field lies, or shorter than a header, is dropped without a reply.
  const before = replies.length;
  const liar = request(P.Opcode.GETATTR, 1, Buffer.alloc(16)).msg;
  liar.writeUInt32LE(9999, 0);
  fs.dispatch(liar);
  fs.dispatch(Buffer.alloc(10));
  await fs.idle();
  t.is(replies.length, before);
});
