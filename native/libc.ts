/**
 * The libc calls Node.js lacks for block storage: fallocate (punch hole, zero range),
 * lseek with SEEK_DATA/SEEK_HOLE, and the block-device ioctls. Linux numbers.
 */
import * as os from 'node:os';
import { BlockError, type ErrnoName, ERRNO } from '../core/errors';
import { lastErrno, lazyLibrary } from './ffi';

interface Libc {
  fallocate(fd: number, mode: number, offset: number, length: number): number;
  lseek(fd: number, offset: number, whence: number): number;
  ioctl(fd: number, request: number, arg: Buffer): number;
}

const libc = lazyLibrary<Libc>(null, 'native/libc', {
  fallocate: ['int', ['int', 'int', 'int64', 'int64']],
  lseek: ['int64', ['int', 'int64', 'int']],
  ioctl: ['int', ['int', 'ulong', 'pointer']],
});

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

const BLKGETSIZE64 = 0x80081272;
const BLKSSZGET = 0x1268;
const BLKPBSZGET = 0x127b;
const BLKDISCARD = 0x1277;
const BLKZEROOUT = 0x127f;

const ERRNO_NAMES = new Map<number, ErrnoName>(Object.entries(ERRNO).map(([name, n]) => [n, name as ErrnoName]));
/** Linux errnos we see from these calls but do not pass on as is. */
const ENXIO = 6;
const ENOTTY = 25;

export class NativeError extends BlockError {
  constructor(
    readonly call: string,
    readonly errnoNumber: number,
  ) {
    const name = ERRNO_NAMES.get(errnoNumber) ?? (errnoNumber === ENOTTY ? 'EOPNOTSUPP' : 'EIO');
    super(name, `${call} failed: ${os.constants.errno ? errnoText(errnoNumber) : `errno ${errnoNumber}`}`);
  }
}

function errnoText(n: number): string {
  const entry = Object.entries(os.constants.errno).find(([, v]) => v === n);
  return entry ? `${entry[0]} (errno ${n})` : `errno ${n}`;
}

function requireLinux(call: string): void {
  if (process.platform !== 'linux') throw new BlockError('ENOSYS', `${call} is only bound for Linux in native/libc (this is ${process.platform})`);
}

export function fallocate(fd: number, mode: number, offset: number, length: number): void {
  requireLinux('fallocate');
  if (libc().fallocate(fd, mode, offset, length) !== 0) throw new NativeError('fallocate', lastErrno());
}

/**
 * lseek(SEEK_DATA / SEEK_HOLE). Returns the offset found, or -1 when the kernel says
 * there is no further data (ENXIO).
 */
export function seekData(fd: number, offset: number, whence: typeof SEEK_DATA | typeof SEEK_HOLE): number {
  requireLinux('lseek');
  const result = Number(libc().lseek(fd, offset, whence));
  if (result < 0) {
    const errno = lastErrno();
    if (errno === ENXIO) return -1;
    throw new NativeError(whence === SEEK_DATA ? 'lseek(SEEK_DATA)' : 'lseek(SEEK_HOLE)', errno);
  }
  return result;
}

function ioctlOut(fd: number, request: number, bytes: number, name: string): Buffer {
  requireLinux(name);
  const out = Buffer.alloc(bytes);
  if (libc().ioctl(fd, request, out) !== 0) throw new NativeError(`ioctl(${name})`, lastErrno());
  return out;
}

/** A block device's size in bytes. */
export function blockDeviceSize(fd: number): number {
  return Number(ioctlOut(fd, BLKGETSIZE64, 8, 'BLKGETSIZE64').readBigUInt64LE());
}

export function blockDeviceSectorSizes(fd: number): { logical: number; physical: number } {
  return {
    logical: ioctlOut(fd, BLKSSZGET, 4, 'BLKSSZGET').readInt32LE(),
    physical: ioctlOut(fd, BLKPBSZGET, 4, 'BLKPBSZGET').readUInt32LE(),
  };
}

function ioctlRange(fd: number, request: number, offset: number, length: number, name: string): void {
  requireLinux(name);
  const range = Buffer.alloc(16);
  range.writeBigUInt64LE(BigInt(offset), 0);
  range.writeBigUInt64LE(BigInt(length), 8);
  if (libc().ioctl(fd, request, range) !== 0) throw new NativeError(`ioctl(${name})`, lastErrno());
}

export function blockDeviceDiscard(fd: number, offset: number, length: number): void {
  ioctlRange(fd, BLKDISCARD, offset, length, 'BLKDISCARD');
}

export function blockDeviceZeroOut(fd: number, offset: number, length: number): void {
  ioctlRange(fd, BLKZEROOUT, offset, length, 'BLKZEROOUT');
}
