/**
 * mmap/munmap for the blkif backend's `sim` platform: guest memory and grant tables are
 * files that frontend and backend map MAP_SHARED. Linux x86_64 constants. The mapped
 * memory is handed out as a Buffer that does not own it: the caller munmaps it, and must
 * not touch the Buffer afterwards.
 */
import { BlockError } from '../core/errors';
import { NativeError } from './libc';
import { ffiModules, lastErrno, lazyLibrary } from './ffi';

interface Mman {
  mmap(addr: Buffer | null, length: number, prot: number, flags: number, fd: number, offset: number): Buffer;
  munmap(addr: Buffer, length: number): number;
}

const mman = lazyLibrary<Mman>(null, 'native/mman', {
  mmap: ['pointer', ['pointer', 'size_t', 'int', 'int', 'int', 'int64']],
  munmap: ['int', ['pointer', 'size_t']],
});

export const PROT_NONE = 0;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
const MAP_SHARED = 0x01;
const MAP_PRIVATE = 0x02;
const MAP_FIXED = 0x10;
const MAP_ANONYMOUS = 0x20;
/** (void *) -1 as a double: what ref.address() gives for MAP_FAILED. */
const MAP_FAILED = 2 ** 64 - 1;

function requireLinux(): void {
  if (process.platform !== 'linux') throw new BlockError('ENOSYS', `mmap is only bound for Linux in native/mman (this is ${process.platform})`);
}

function checked(p: Buffer, call: string): Buffer {
  const address = ffiModules('native/mman').ref.address(p);
  if (address === MAP_FAILED || address === 0) throw new NativeError(call, lastErrno());
  return p;
}

/** A region of memory mapped into this process, viewed as a Buffer of `length` bytes. */
export interface Mapping {
  readonly bytes: Buffer;
  readonly length: number;
  unmap(): void;
}

function mappingOf(base: Buffer, length: number): Mapping {
  const { ref } = ffiModules('native/mman');
  const bytes = ref.reinterpret(base, length, 0);
  let mapped = true;
  return {
    bytes,
    length,
    unmap() {
      if (!mapped) return;
      mapped = false;
      if (mman().munmap(base, length) !== 0) throw new NativeError('munmap', lastErrno());
    },
  };
}

/** Maps `length` bytes of file `fd` from `offset` (page aligned), shared with every other mapper. */
export function mapShared(fd: number, length: number, offset: number, writable: boolean): Mapping {
  requireLinux();
  if (length <= 0) throw new BlockError('EINVAL', 'mmap of an empty range');
  const prot = PROT_READ | (writable ? PROT_WRITE : 0);
  const base = checked(mman().mmap(null, length, prot, MAP_SHARED, fd, offset), 'mmap');
  return mappingOf(base, length);
}

/**
 * Maps scattered pages of one file as one virtually contiguous region (what Xen's
 * gntdev does for a multi-page ring): reserves the address range, then maps each file
 * page over its place with MAP_FIXED.
 */
export function mapPagesContiguous(fd: number, pageIndexes: number[], pageSize: number, writable: boolean): Mapping {
  requireLinux();
  const { ref } = ffiModules('native/mman');
  const length = pageIndexes.length * pageSize;
  if (length <= 0) throw new BlockError('EINVAL', 'mmap of no pages');
  const base = checked(mman().mmap(null, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), 'mmap (reserve)');
  const prot = PROT_READ | (writable ? PROT_WRITE : 0);
  try {
    pageIndexes.forEach((page, i) => {
      const at = ref.reinterpret(base, pageSize, i * pageSize);
      checked(mman().mmap(at, pageSize, prot, MAP_SHARED | MAP_FIXED, fd, page * pageSize), 'mmap (fixed page)');
    });
  } catch (e) {
    mman().munmap(base, length);
    throw e;
  }
  return mappingOf(base, length);
}
