/**
 * libxenevtchn (Xen's event-channel library, Debian package libxenevtchn1): bind to a
 * frontend's port, notify it, and learn which of our ports fired. `pending()` blocks, so
 * it runs on a libuv worker thread (ffi's async call) while the event loop stays free.
 */
import * as fs from 'node:fs';
import { BlockError } from '../core/errors';
import { NativeError } from './libc';
import { ffiModules, lastErrno, lazyLibrary, preparedFunction } from './ffi';

interface Evtchn {
  xenevtchn_open(logger: Buffer | null, flags: number): Buffer;
  xenevtchn_close(handle: Buffer): number;
  xenevtchn_fd(handle: Buffer): number;
  xenevtchn_bind_interdomain(handle: Buffer, domid: number, remotePort: number): number;
  xenevtchn_bind_unbound_port(handle: Buffer, domid: number): number;
  xenevtchn_unbind(handle: Buffer, port: number): number;
  xenevtchn_pending: ((handle: Buffer) => number) & { async(handle: Buffer, cb: (err: Error | null, port: number) => void): void };
}

const evtchn = lazyLibrary<Evtchn>('libxenevtchn.so.1', 'the Xen platform (event channels)', {
  xenevtchn_open: ['pointer', ['pointer', 'uint']],
  xenevtchn_close: ['int', ['pointer']],
  xenevtchn_fd: ['int', ['pointer']],
  xenevtchn_bind_interdomain: ['int', ['pointer', 'uint32', 'uint32']],
  xenevtchn_bind_unbound_port: ['int', ['pointer', 'uint32']],
  xenevtchn_unbind: ['int', ['pointer', 'uint32']],
  xenevtchn_pending: ['int', ['pointer']],
});

// Called for every notification sent and received: prepared calls (native/ffi.ts).
const notifyCall = preparedFunction('libxenevtchn.so.1', 'the Xen platform (event channels)', 'xenevtchn_notify', ['pointer', 'uint32']);
const unmaskCall = preparedFunction('libxenevtchn.so.1', 'the Xen platform (event channels)', 'xenevtchn_unmask', ['pointer', 'uint32']);

export function requireEvtchnDevice(): void {
  if (process.platform !== 'linux') throw new BlockError('ENOSYS', `the Xen platform's event channels are only bound for Linux dom0 here (this is ${process.platform})`);
  if (!fs.existsSync('/dev/xen/evtchn')) throw new BlockError('ENODEV', '/dev/xen/evtchn is absent: not a Xen dom0, or the xen-evtchn module is not loaded');
}

/** One open /dev/xen/evtchn: its ports and a blocking wait for the next pending one. */
export class EvtchnHandle {
  private handle?: Buffer;

  constructor() {
    requireEvtchnDevice();
    const { ref } = ffiModules('the Xen platform');
    const h = evtchn().xenevtchn_open(null, 0);
    if (ref.isNull(h)) throw new NativeError('xenevtchn_open', lastErrno());
    this.handle = h;
  }

  private get h(): Buffer {
    if (!this.handle) throw new BlockError('EBADF', 'event channel handle is closed');
    return this.handle;
  }

  /** Binds a local port to (domid, remotePort); returns the local port. */
  bindInterdomain(domid: number, remotePort: number): number {
    const port = evtchn().xenevtchn_bind_interdomain(this.h, domid, remotePort);
    if (port < 0) throw new NativeError(`xenevtchn_bind_interdomain (domain ${domid}, port ${remotePort})`, lastErrno());
    return port;
  }

  /** Allocates a port that domain `domid` may bind to; returns it. */
  bindUnbound(domid: number): number {
    const port = evtchn().xenevtchn_bind_unbound_port(this.h, domid);
    if (port < 0) throw new NativeError('xenevtchn_bind_unbound_port', lastErrno());
    return port;
  }

  notify(localPort: number): void {
    const call = notifyCall();
    call.pointer(0, this.h);
    call.integer(1, localPort);
    if (call.call() !== 0) throw new NativeError('xenevtchn_notify', lastErrno());
  }

  unmask(localPort: number): void {
    const call = unmaskCall();
    call.pointer(0, this.h);
    call.integer(1, localPort);
    if (call.call() !== 0) throw new NativeError('xenevtchn_unmask', lastErrno());
  }

  unbind(localPort: number): void {
    if (evtchn().xenevtchn_unbind(this.h, localPort) !== 0) throw new NativeError('xenevtchn_unbind', lastErrno());
  }

  /** Waits (on a worker thread) for the next pending local port. The port stays masked until unmask(). */
  pending(): Promise<number> {
    const h = this.h;
    return new Promise((resolve, reject) => {
      evtchn().xenevtchn_pending.async(h, (err, port) => {
        if (err) reject(err);
        else if (port < 0) reject(new NativeError('xenevtchn_pending', lastErrno()));
        else resolve(port);
      });
    });
  }

  /** Closes the handle; no pending() may be running. */
  close(): void {
    if (!this.handle) return;
    evtchn().xenevtchn_close(this.handle);
    this.handle = undefined;
  }
}
