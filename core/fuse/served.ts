/**
 * A served mount: a FuseExport plus what makes it manageable from outside and from the
 * process serving it. Shared by `tapkit mount` (one mount, in the foreground) and the
 * daemon's `fuse:` export kind (many mounts in one process):
 *  - the state file and control socket `tapkit unmount` finds the server by
 *    (core/fuse/control.ts);
 *  - optionally a loop device over the file;
 *  - the ordered stop: detach the loop device, flush the VBD, unmount; when the mount is
 *    still in use, abort its FUSE connection so nothing waits on a server that is leaving.
 */
import { BlockError } from '../errors';
import type { Vbd } from '../vbd';
import { listenControl, removeState, writeState, type MountState } from './control';
import { FuseExport, type FuseExportOptions } from './export';
import { attachLoop, detachLoop, loopsBackedBy, type LoopDevice } from './loop';
import type * as net from 'node:net';

export interface ServeOptions extends FuseExportOptions {
  /** What was opened (for `status` and the state file). */
  spec: string;
  /** Attach the file to a free loop device. */
  loop?: boolean;
  /** Set when the daemon serves the mount: `tapkit unmount` then points at `tapkit ctl destroy`. */
  daemonDevice?: string;
}

/** How long a stop waits for a loop device's last user to close it before unmounting anyway. */
const LOOP_RELEASE_MS = 10_000;
/** How long a stop waits for the VBD flush before unmounting anyway. */
const STOP_FLUSH_MS = 60_000;

export class ServedMount {
  readonly state: MountState;
  /** Resolves once the connection is gone (unmounted or aborted) and the state file removed. */
  readonly ended: Promise<void>;
  private control?: net.Server;
  private stopping?: Promise<boolean>;

  private constructor(
    readonly exported: FuseExport,
    private readonly log: (message: string) => void,
    spec: string,
    daemonDevice: string | undefined,
  ) {
    this.state = { pid: process.pid, mountpoint: exported.mountpoint, file: exported.file, spec, connection: exported.connection, ...(daemonDevice !== undefined ? { daemonDevice } : {}) };
    this.ended = exported.ended.then(() => {
      this.control?.close();
      removeState(exported.mountpoint);
    });
  }

  /** Mounts, publishes the state and control socket, attaches the loop device. All or nothing. */
  static async start(vbd: Vbd, options: ServeOptions): Promise<ServedMount> {
    const log = options.log ?? ((m: string) => process.stderr.write(`tapkit: fuse: ${m}\n`));
    const exported = await FuseExport.mount(vbd, { ...options, log });
    const served = new ServedMount(exported, log, options.spec, options.daemonDevice);
    try {
      writeState(served.state);
      served.control = await listenControl(exported.mountpoint, { flush: () => exported.flush(), status: () => served.state });
      if (options.loop) {
        const loop: LoopDevice = await attachLoop(exported.file, { readOnly: exported.readOnly });
        served.state.loop = loop.device;
        served.state.directIo = loop.directIo;
        writeState(served.state);
        if (!loop.directIo) log(`${loop.device} does buffered I/O on ${exported.file} (direct I/O was refused)`);
      }
    } catch (e) {
      await served.stop();
      await served.ended;
      throw e;
    }
    return served;
  }

  get mountpoint(): string {
    return this.exported.mountpoint;
  }

  get file(): string {
    return this.exported.file;
  }

  /** The loop device over the file, when one was attached. */
  get loop(): string | undefined {
    return this.state.loop;
  }

  /**
   * Detaches the loop device, flushes the VBD, unmounts, in that order. Returns false when
   * the mount was still in use: its connection is then aborted (its users get errors) and
   * the mount left for `tapkit unmount` to clean up. `ended` resolves either way.
   */
  stop(): Promise<boolean> {
    this.stopping ??= (async () => {
      if (this.state.loop) await this.detachLoopBounded(this.state.loop);
      // A paused VBD (the daemon's pause) would hold the flush until resumed; the
      // daemon flushes when it closes the device after its exports.
      if (!this.exported.vbd.isPaused) await this.flushBounded();
      if (this.exported.unmount()) return true;
      this.log(`${this.mountpoint} is still in use; aborting its FUSE connection (clean up with: tapkit unmount ${this.mountpoint})`);
      this.abort();
      return false;
    })();
    return this.stopping;
  }

  /**
   * Detaches the loop device. When a user still has it open (xen-blkback tearing down a
   * guest's disk closes it a moment after the toolstack's remove script starts), the
   * kernel only marks it to detach on last close: wait up to LOOP_RELEASE_MS for that,
   * so the unmount that follows is not refused for a loop device about to go.
   */
  private async detachLoopBounded(device: string): Promise<void> {
    try {
      await detachLoop(device, this.file);
      return;
    } catch (e) {
      if (!(e instanceof BlockError) || e.code !== 'EBUSY') {
        this.log((e as Error).message);
        return;
      }
    }
    const deadline = Date.now() + LOOP_RELEASE_MS;
    while (loopsBackedBy({ file: this.file }).some((l) => l.device === device)) {
      if (Date.now() > deadline) {
        this.log(`${device} is still in use after ${LOOP_RELEASE_MS / 1000} s; it detaches when its last user closes it`);
        return;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  /** Flushes the VBD, giving up (with a log line) after STOP_FLUSH_MS. */
  private async flushBounded(): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const tooLong = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new BlockError('ETIMEDOUT', `flush took longer than ${STOP_FLUSH_MS / 1000} s`)), STOP_FLUSH_MS);
    });
    await Promise.race([this.exported.flush(), tooLong])
      .catch((e) => this.log(`flush before unmount failed: ${(e as Error).message}`))
      .finally(() => clearTimeout(timer));
  }

  /** Aborts the connection at once (a fatal error in the server): users get errors, not a hang. */
  abort(): void {
    this.exported.abort();
  }
}
