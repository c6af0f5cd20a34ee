/**
 * mount(2) and umount2(2), which Node.js lacks: the FUSE export mounts /dev/fuse itself
 * (no fusermount, no libfuse) and mounts fusectl to abort a dead connection. Linux numbers.
 */
import { BlockError } from '../core/errors';
import { lastErrno, lazyLibrary } from './ffi';
import { NativeError } from './libc';

interface LibcMount {
  mount(source: string, target: string, fstype: string, flags: number, data: string | null): number;
  umount2(target: string, flags: number): number;
}

const libc = lazyLibrary<LibcMount>(null, 'native/mount', {
  mount: ['int', ['string', 'string', 'string', 'ulong', 'string']],
  umount2: ['int', ['string', 'int']],
});

export const MS_RDONLY = 0x1;
export const MS_NOSUID = 0x2;
export const MS_NODEV = 0x4;
export const MS_NOEXEC = 0x8;

export const MNT_FORCE = 0x1;
export const MNT_DETACH = 0x2;

/** errno numbers callers test for (EBUSY: still in use; EINVAL: not a mount point). */
export const MOUNT_EBUSY = 16;
export const MOUNT_EINVAL = 22;

function requireLinux(call: string): void {
  if (process.platform !== 'linux') throw new BlockError('ENOSYS', `${call} is only bound for Linux in native/mount (this is ${process.platform})`);
}

/** mount(2). `data` is the file system's option string (for FUSE: fd=N,rootmode=...). */
export function mount(source: string, target: string, fstype: string, flags: number, data: string | null): void {
  requireLinux('mount');
  if (libc().mount(source, target, fstype, flags, data) !== 0) throw new NativeError(`mount ${fstype} on ${target}`, lastErrno());
}

/** umount2(2). Throws a NativeError whose `errnoNumber` says why (EBUSY, EINVAL, ...). */
export function umount2(target: string, flags = 0): void {
  requireLinux('umount2');
  if (libc().umount2(target, flags) !== 0) throw new NativeError(`umount ${target}`, lastErrno());
}
