/**
 * The /dev/fuse channel: reads requests and writes replies on one file descriptor.
 *
 * A read of /dev/fuse blocks until the kernel has a request and returns exactly one
 * whole message, so reads run on the libuv thread pool (fs.read) with several
 * outstanding at once: requests are picked up while earlier ones are still being served.
 * Each read gets its own buffer, large enough for the biggest WRITE (max_write plus
 * headers); a buffer goes back to the pool once its request no longer needs it.
 * Replies are single write(2) calls, which the kernel copies at once (never blocks).
 */
import * as fs from 'node:fs';

export interface ChannelOptions {
  /** Size of each read buffer: at least max_write + the in-header + fuse_write_in. */
  bufferSize: number;
  /** Reads kept outstanding on the thread pool. */
  readers: number;
  log?: (message: string) => void;
}

export type MessageHandler = (msg: Buffer, release: () => void) => void;

/** errno names of a read that should simply be retried. */
const RETRY = new Set(['EINTR', 'EAGAIN', 'ENOENT']);

export class DevFuseChannel {
  private readonly free: Buffer[] = [];
  private readersRunning = 0;
  private endError: Error | undefined;
  private ended = false;
  private endResolve!: () => void;
  /** Resolves when every reader has stopped: the connection is gone (unmounted or aborted). */
  readonly done: Promise<void> = new Promise((resolve) => (this.endResolve = resolve));

  constructor(
    readonly fd: number,
    private readonly options: ChannelOptions,
  ) {}

  /** The error that stopped the readers, when it was not the normal end (ENODEV). */
  get error(): Error | undefined {
    return this.endError;
  }

  start(onMessage: MessageHandler): void {
    for (let i = 0; i < this.options.readers; i++) {
      this.readersRunning++;
      this.arm(onMessage);
    }
  }

  /** write(2) copies the reply into the kernel before it returns. */
  readonly copiesReplies = true;

  /** Sends one reply. A reply to a request the kernel dropped (interrupted, aborted) is ignored. */
  send(reply: Buffer): void {
    try {
      fs.writeSync(this.fd, reply);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      // ENOENT: the request was interrupted and withdrawn; ENODEV: the connection is gone.
      if (code === 'ENOENT' || code === 'ENODEV') return;
      this.options.log?.(`writing a FUSE reply failed: ${(e as Error).message}`);
    }
  }

  private take(): Buffer {
    return this.free.pop() ?? Buffer.allocUnsafe(this.options.bufferSize);
  }

  private give(buf: Buffer): void {
    if (this.free.length < this.options.readers * 2) this.free.push(buf);
  }

  private arm(onMessage: MessageHandler): void {
    const buf = this.take();
    fs.read(this.fd, buf, 0, buf.length, null, (err, n) => {
      if (err) {
        if (RETRY.has(err.code ?? '') && !this.ended) {
          this.give(buf);
          this.arm(onMessage);
          return;
        }
        // ENODEV: unmounted or aborted, the normal end. Anything else also ends the session.
        if (err.code !== 'ENODEV' && !this.endError) this.endError = err;
        this.ended = true;
        if (--this.readersRunning === 0) this.endResolve();
        return;
      }
      // Keep a read outstanding before serving this one.
      this.arm(onMessage);
      let released = false;
      onMessage(buf.subarray(0, n), () => {
        if (released) return;
        released = true;
        this.give(buf);
      });
    });
  }
}
