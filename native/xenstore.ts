/**
 * libxenstore (Debian package libxenstore4): XenStore reads, writes, directories,
 * transactions and watches, through the xenstored socket or /dev/xen/xenbus.
 *
 * Requests are short synchronous calls. Watch events come from xs_read_watch, which
 * blocks, so it runs on a libuv worker thread (ffi's async call) in a loop; libxenstore
 * is thread-safe for this (its own reader thread hands requests' replies and watch events
 * to whoever waits for them).
 */
import * as fs from 'node:fs';
import { BlockError } from '../core/errors';
import { NativeError } from './libc';
import { ffiModules, lastErrno, lazyLibrary } from './ffi';

type AsyncFn<A extends unknown[], R> = ((...args: A) => R) & { async(...args: [...A, (err: Error | null, result: R) => void]): void };

interface Xs {
  xs_open(flags: number): Buffer;
  xs_close(h: Buffer): void;
  xs_read(h: Buffer, tx: number, path: string, len: Buffer): Buffer;
  xs_write(h: Buffer, tx: number, path: string, data: Buffer, len: number): boolean;
  xs_directory(h: Buffer, tx: number, path: string, num: Buffer): Buffer;
  xs_rm(h: Buffer, tx: number, path: string): boolean;
  xs_watch(h: Buffer, path: string, token: string): boolean;
  xs_unwatch(h: Buffer, path: string, token: string): boolean;
  xs_read_watch: AsyncFn<[Buffer, Buffer], Buffer>;
  xs_transaction_start(h: Buffer): number;
  xs_transaction_end(h: Buffer, tx: number, abort: boolean): boolean;
  xs_set_permissions(h: Buffer, tx: number, path: string, perms: Buffer, count: number): boolean;
}

const xs = lazyLibrary<Xs>('libxenstore.so.4', 'the Xen platform (XenStore)', {
  xs_open: ['pointer', ['ulong']],
  xs_close: ['void', ['pointer']],
  xs_read: ['pointer', ['pointer', 'uint32', 'string', 'pointer']],
  xs_write: ['bool', ['pointer', 'uint32', 'string', 'pointer', 'uint']],
  xs_directory: ['pointer', ['pointer', 'uint32', 'string', 'pointer']],
  xs_rm: ['bool', ['pointer', 'uint32', 'string']],
  xs_watch: ['bool', ['pointer', 'string', 'string']],
  xs_unwatch: ['bool', ['pointer', 'string', 'string']],
  xs_read_watch: ['pointer', ['pointer', 'pointer']],
  xs_transaction_start: ['uint32', ['pointer']],
  xs_transaction_end: ['bool', ['pointer', 'uint32', 'bool']],
  xs_set_permissions: ['bool', ['pointer', 'uint32', 'string', 'pointer', 'uint']],
});

/** xenstore_lib.h's XS_PERM_* bits by Xen's letters (n: none, r, w, b: both). */
const PERM_BITS: Record<string, number> = { n: 0, r: 1, w: 2, b: 3 };

/** `['n5', 'r0']` as an array of struct xs_permissions {unsigned id; unsigned perms;}. */
export function encodePermissions(permissions: string[]): Buffer {
  const out = Buffer.alloc(8 * permissions.length);
  permissions.forEach((p, i) => {
    const m = /^([nrwb])(\d+)$/.exec(p);
    if (!m || Number(m[2]) > 0xffff) throw new BlockError('EINVAL', `XenStore permission '${p}' is not LETTER+DOMID (n, r, w or b)`);
    out.writeUInt32LE(Number(m[2]), 8 * i);
    out.writeUInt32LE(PERM_BITS[m[1]], 8 * i + 4);
  });
  return out;
}

const libc = lazyLibrary<{ free(p: Buffer): void }>(null, 'native/xenstore', { free: ['void', ['pointer']] });

const ENOENT = 2;
const EAGAIN = 11;
/** Indexes into the vector xs_read_watch returns. */
const XS_WATCH_PATH = 0;
const XS_WATCH_TOKEN = 1;

/** Where libxenstore can reach a XenStore: xenstored's socket, or the kernel's xenbus device. */
export function requireXenStore(): void {
  if (process.platform !== 'linux') throw new BlockError('ENOSYS', `the Xen platform's XenStore binding is only for Linux dom0 here (this is ${process.platform})`);
  const paths = [process.env.XENSTORED_PATH, '/run/xenstored/socket', '/var/run/xenstored/socket', '/dev/xen/xenbus'].filter((p): p is string => !!p);
  if (!paths.some((p) => fs.existsSync(p))) throw new BlockError('ENODEV', `no XenStore here: none of ${paths.join(', ')} exists (not a Xen dom0?)`);
}

/** Reads `count` C strings from an array of char pointers. */
function stringVector(vector: Buffer, count: number): string[] {
  const { ref } = ffiModules('the Xen platform');
  const out: string[] = [];
  for (let i = 0; i < count; i++) out.push(ref.readCString(ref.readPointer(vector, i * ref.sizeof.pointer, 0), 0));
  return out;
}

export class XsHandle {
  private handle?: Buffer;
  private readonly watches = new Map<string, (path: string) => void>();
  private watchLoop?: Promise<void>;
  private closing = false;
  private nextToken = 1;

  constructor() {
    requireXenStore();
    const { ref } = ffiModules('the Xen platform');
    const h = xs().xs_open(0);
    if (ref.isNull(h)) throw new NativeError('xs_open', lastErrno());
    this.handle = h;
  }

  private get h(): Buffer {
    if (!this.handle) throw new BlockError('EBADF', 'XenStore handle is closed');
    return this.handle;
  }

  read(path: string, tx = 0): string | undefined {
    const { ref } = ffiModules('the Xen platform');
    const len = Buffer.alloc(4);
    const p = xs().xs_read(this.h, tx, path, len);
    if (ref.isNull(p)) {
      const errno = lastErrno();
      if (errno === ENOENT) return undefined;
      throw new NativeError(`xs_read ${path}`, errno);
    }
    try {
      return ref.reinterpret(p, len.readUInt32LE(0), 0).toString('utf8');
    } finally {
      libc().free(p);
    }
  }

  write(path: string, value: string, tx = 0): void {
    const data = Buffer.from(value, 'utf8');
    if (!xs().xs_write(this.h, tx, path, data, data.length)) throw new NativeError(`xs_write ${path}`, lastErrno());
  }

  directory(path: string, tx = 0): string[] {
    const { ref } = ffiModules('the Xen platform');
    const num = Buffer.alloc(4);
    const p = xs().xs_directory(this.h, tx, path, num);
    if (ref.isNull(p)) {
      const errno = lastErrno();
      if (errno === ENOENT) return [];
      throw new NativeError(`xs_directory ${path}`, errno);
    }
    try {
      return stringVector(p, num.readUInt32LE(0));
    } finally {
      libc().free(p);
    }
  }

  rm(path: string, tx = 0): void {
    if (!xs().xs_rm(this.h, tx, path)) {
      const errno = lastErrno();
      if (errno !== ENOENT) throw new NativeError(`xs_rm ${path}`, errno);
    }
  }

  /** Sets `path`'s permissions, owner first, in Xen's letters (`n5`, `r0`, `w3`, `b2`). */
  setPermissions(path: string, permissions: string[], tx = 0): void {
    if (permissions.length === 0) throw new BlockError('EINVAL', `no permissions given for ${path}`);
    const table = encodePermissions(permissions);
    if (!xs().xs_set_permissions(this.h, tx, path, table, permissions.length)) throw new NativeError(`xs_set_permissions ${path}`, lastErrno());
  }

  transactionStart(): number {
    const tx = xs().xs_transaction_start(this.h);
    if (tx === 0) throw new NativeError('xs_transaction_start', lastErrno());
    return tx;
  }

  /** Commits or aborts; false when the commit conflicted (EAGAIN) and must be retried. */
  transactionEnd(tx: number, commit: boolean): boolean {
    if (xs().xs_transaction_end(this.h, tx, !commit)) return true;
    const errno = lastErrno();
    if (errno === EAGAIN) return false;
    throw new NativeError('xs_transaction_end', errno);
  }

  /** Sets a watch; `onChange` runs on the event loop for the first firing and every change. */
  watch(path: string, onChange: (path: string) => void): { cancel(): void } {
    const token = `tapkit-${process.pid}-${this.nextToken++}`;
    this.watches.set(token, onChange);
    if (!xs().xs_watch(this.h, path, token)) {
      this.watches.delete(token);
      throw new NativeError(`xs_watch ${path}`, lastErrno());
    }
    this.watchLoop ??= this.readWatches();
    return {
      cancel: () => {
        if (!this.watches.delete(token) || !this.handle) return;
        xs().xs_unwatch(this.handle, path, token);
      },
    };
  }

  /** Takes watch events one at a time on a worker thread until close(). */
  private async readWatches(): Promise<void> {
    const h = this.h;
    const { ref } = ffiModules('the Xen platform');
    for (;;) {
      const event = await new Promise<[string, string] | undefined>((resolve, reject) => {
        const num = Buffer.alloc(4);
        xs().xs_read_watch.async(h, num, (err, vector) => {
          if (err) return reject(err);
          if (ref.isNull(vector)) return resolve(undefined);
          try {
            const words = stringVector(vector, num.readUInt32LE(0));
            resolve([words[XS_WATCH_PATH], words[XS_WATCH_TOKEN]]);
          } finally {
            libc().free(vector);
          }
        });
      });
      if (this.closing) return;
      if (!event) continue;
      const [path, token] = event;
      this.watches.get(token)?.(path);
    }
  }

  /**
   * Closes the handle. The watch thread is blocked in xs_read_watch: a last watch (which
   * fires at once) wakes it, then the handle is closed.
   */
  async close(): Promise<void> {
    if (!this.handle || this.closing) return;
    this.closing = true;
    if (this.watchLoop) {
      const token = `tapkit-${process.pid}-stop`;
      xs().xs_watch(this.handle, '/local/domain/0', token);
      await this.watchLoop.catch(() => undefined);
      xs().xs_unwatch(this.handle, '/local/domain/0', token);
    }
    for (const token of this.watches.keys()) this.watches.delete(token);
    xs().xs_close(this.handle);
    this.handle = undefined;
  }
}
