/**
 * A VBD exported through the kernel's FUSE channel as one file: opens /dev/fuse, mounts
 * it with mount(2) (`fd=N`, no fusermount or libfuse), serves the one-file file system
 * on it, and knows its fusectl connection so a failing server can abort it.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockError } from '../errors';
import type { Vbd } from '../vbd';
import { MNT_DETACH, MOUNT_EBUSY, MOUNT_EINVAL, MS_NODEV, MS_NOSUID, MS_RDONLY, mount, umount2 } from '../../native/mount';
import type { NativeError } from '../../native/libc';
import { DevFuseChannel } from './channel';
import { OneFileFs } from './filesystem';
import { abortConnection, connectionOf, findMount, resolveMountpoint } from './mounts';
import { IN_HEADER_SIZE, WRITE_IN_SIZE } from './protocol';

export const FUSE_FSTYPE = 'fuse.tapkit';

export interface FuseExportOptions {
  /** An existing directory (absolute or relative). */
  mountpoint: string;
  /** The file's name in the mount (default `disk`). */
  name?: string;
  readOnly?: boolean;
  /** Let users other than the mounting one use the file (mount option allow_other). */
  allowOther?: boolean;
  /** Largest WRITE request (default 1 MiB). */
  maxWrite?: number;
  /** Reads of /dev/fuse kept outstanding (default 8; each holds a thread-pool thread). */
  readers?: number;
  log?: (message: string) => void;
}

export const DEFAULT_READERS = 8;

/**
 * Every outstanding /dev/fuse read holds a libuv thread-pool thread until the kernel has a
 * request. Mounts in one process share the pool, so each reserves its readers and a mount
 * that would leave fewer than SPARE_THREADS for file I/O (and the other mounts' replies to
 * make progress) is refused instead of deadlocking the process. The pool's size is fixed
 * by UV_THREADPOOL_SIZE when the pool first starts (libuv's default is 4); the CLI
 * commands that serve mounts raise it before anything uses the pool.
 */
export const SPARE_THREADS = 4;
let readersReserved = 0;

export function threadPoolSize(): number {
  return Number(process.env.UV_THREADPOOL_SIZE) || 4;
}

function reserveReaders(readers: number): () => void {
  const pool = threadPoolSize();
  if (readersReserved + readers > pool - SPARE_THREADS) {
    throw new BlockError(
      'EBUSY',
      `no room for another FUSE mount: ${readersReserved} of ${pool} thread-pool threads already wait on /dev/fuse and ${readers} more would leave fewer than ${SPARE_THREADS} free (raise UV_THREADPOOL_SIZE)`,
    );
  }
  readersReserved += readers;
  let released = false;
  return () => {
    if (!released) readersReserved -= readers;
    released = true;
  };
}

export class FuseExport {
  readonly file: string;
  /** Resolves when the connection is gone (unmounted, aborted) and every reader stopped. */
  readonly ended: Promise<void>;

  private constructor(
    readonly vbd: Vbd,
    readonly mountpoint: string,
    readonly name: string,
    readonly readOnly: boolean,
    readonly connection: number,
    readonly filesystem: OneFileFs,
    channel: DevFuseChannel,
  ) {
    this.file = path.join(mountpoint, name);
    this.ended = channel.done.then(async () => {
      await filesystem.idle();
      fs.closeSync(channel.fd);
    });
  }

  static async mount(vbd: Vbd, options: FuseExportOptions): Promise<FuseExport> {
    let mountpoint = resolveMountpoint(options.mountpoint);
    // Never stat a FUSE mount: this very process may be the one serving it (a daemon asked
    // twice for the same mount point), and a stat would wait for itself.
    const existing = findMount(mountpoint);
    if (existing?.fstype.startsWith('fuse')) throw new BlockError('EBUSY', `${mountpoint} is already a FUSE mount (${existing.fstype})`);
    try {
      mountpoint = fs.realpathSync(mountpoint);
    } catch {
      throw new BlockError('ENOENT', `mount point ${options.mountpoint} does not exist`);
    }
    if (!fs.statSync(mountpoint).isDirectory()) throw new BlockError('EINVAL', `${mountpoint} is not a directory`);
    const name = options.name ?? 'disk';
    if (!name || name.includes('/') || name === '.' || name === '..' || Buffer.byteLength(name) > 255) {
      throw new BlockError('EINVAL', `'${name}' is not a valid file name`);
    }
    const readOnly = !!options.readOnly || vbd.info().readOnly;
    const maxWrite = options.maxWrite ?? 1 << 20;
    const log = options.log ?? ((m: string) => process.stderr.write(`tapkit: fuse: ${m}\n`));
    const readers = options.readers ?? DEFAULT_READERS;
    const release = reserveReaders(readers);
    try {
      let fd: number;
      try {
        fd = fs.openSync('/dev/fuse', 'r+');
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        throw new BlockError(code === 'ENOENT' ? 'ENODEV' : 'EACCES', `cannot open /dev/fuse (${code}): ${code === 'ENOENT' ? 'load the fuse module' : 'mounting needs root'}`);
      }
      const uid = process.getuid?.() ?? 0;
      const gid = process.getgid?.() ?? 0;
      const data = [`fd=${fd}`, 'rootmode=40000', `user_id=${uid}`, `group_id=${gid}`, 'default_permissions', ...(options.allowOther ? ['allow_other'] : [])].join(',');
      try {
        mount('tapkit', mountpoint, FUSE_FSTYPE, MS_NOSUID | MS_NODEV | (readOnly ? MS_RDONLY : 0), data);
      } catch (e) {
        fs.closeSync(fd);
        throw e;
      }
      const entry = findMount(mountpoint);
      if (!entry || entry.fstype !== FUSE_FSTYPE) {
        fs.closeSync(fd);
        throw new BlockError('EIO', `mounted ${mountpoint} but cannot find it in /proc/self/mountinfo`);
      }
      const channel = new DevFuseChannel(fd, {
        bufferSize: Math.max(8192, IN_HEADER_SIZE + WRITE_IN_SIZE + maxWrite + 4096),
        readers,
        log,
      });
      void channel.done.then(release);
      const filesystem = new OneFileFs(vbd, channel, { name, readOnly, uid, gid, maxWrite, log });
      const exported = new FuseExport(vbd, mountpoint, name, readOnly, connectionOf(entry), filesystem, channel);
      channel.start((msg, release) => filesystem.dispatch(msg, release));
      // The kernel sends INIT as soon as the mount exists; nothing else is served before it.
      const ended = channel.done.then(() => {
        throw new BlockError('EIO', `the FUSE connection of ${mountpoint} ended before INIT${channel.error ? `: ${channel.error.message}` : ''}`);
      });
      await Promise.race([filesystem.initialized(), ended]);
      ended.catch(() => {});
      return exported;
    } catch (e) {
      release();
      throw e;
    }
  }

  /** Flushes the VBD (what FSYNC does), for `tapkit unmount` and signals. */
  flush(): Promise<void> {
    return this.vbd.flush();
  }

  /**
   * umount2(2). Returns false when the mount is busy (a loop device or an open file
   * holds it), true when unmounted or already gone.
   */
  unmount(options: { lazy?: boolean } = {}): boolean {
    try {
      umount2(this.mountpoint, options.lazy ? MNT_DETACH : 0);
      return true;
    } catch (e) {
      const errno = (e as NativeError).errnoNumber;
      if (errno === MOUNT_EBUSY) return false;
      if (errno === MOUNT_EINVAL && findMount(this.mountpoint)?.fstype !== FUSE_FSTYPE) return true;
      throw e;
    }
  }

  /** Aborts the connection: users of the file get errors (ENOTCONN) instead of waiting on us. */
  abort(): void {
    abortConnection(this.connection);
  }
}
