/**
 * The `sim` platform's event channels (XENSIM.md "D/evtchn.sock"): a Unix socket that
 * carries u32 port numbers. A guest connects, says its domain id, then writes the ports it
 * raises; it reads the ports raised towards it. The backend (domain 0) lives in this
 * process and binds (guest domain, guest port) directly.
 *
 * The hub never blocks on a client: notifications pending for one port coalesce, and a
 * client whose unread backlog passes a bound is disconnected.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import type { EventChannel, EventChannels } from '../platform';

/** Bytes a guest may leave unread before it is cut off. */
const BACKLOG_LIMIT = 256 * 1024;

class GuestConnection {
  domid?: number;
  private pending: Buffer = Buffer.alloc(0);
  /** Ports raised while bytes were unsent, written together at the end of the stretch. */
  private readonly toSend = new Set<number>();
  private flushScheduled = false;

  constructor(
    readonly socket: net.Socket,
    private readonly hub: EventHub,
  ) {
    socket.on('data', (chunk: Buffer) => this.receive(chunk));
    socket.on('error', () => socket.destroy());
    socket.on('close', () => hub.forget(this));
  }

  private receive(chunk: Buffer): void {
    this.pending = this.pending.length ? Buffer.concat([this.pending, chunk]) : chunk;
    let at = 0;
    for (; at + 4 <= this.pending.length; at += 4) {
      const word = this.pending.readUInt32LE(at);
      if (this.domid === undefined) {
        if (word === 0 || word > 0x7fef) {
          this.socket.destroy();
          return;
        }
        this.domid = word;
        this.hub.hello(this);
      } else if (word !== 0) {
        this.hub.raisedByGuest(this.domid, word);
      }
    }
    this.pending = this.pending.subarray(at);
  }

  /**
   * Written at once when nothing is waiting to be sent: a queue raises its channel when
   * it publishes responses the frontend waits for, and the frontend should hear about
   * them while the backend goes on with its next requests, not at the end of the
   * backend's turn. While earlier bytes are still unsent (a guest slow to read), ports
   * raised in the same synchronous stretch coalesce and go out in one write at its end.
   */
  deliver(port: number): void {
    if (this.socket.destroyed) return;
    if (this.socket.writableLength === 0 && !this.flushScheduled) {
      this.send([port]);
      return;
    }
    this.toSend.add(port);
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    queueMicrotask(() => {
      this.flushScheduled = false;
      if (this.socket.destroyed || this.toSend.size === 0) return;
      const ports = [...this.toSend];
      this.toSend.clear();
      this.send(ports);
    });
  }

  private send(ports: number[]): void {
    const out = Buffer.allocUnsafe(4 * ports.length);
    ports.forEach((p, i) => out.writeUInt32LE(p, 4 * i));
    this.socket.write(out);
    if (this.socket.writableLength > BACKLOG_LIMIT) this.socket.destroy();
  }
}

interface Binding {
  domid: number;
  port: number;
  onEvent(): void;
  scheduled: boolean;
}

export class EventHub implements EventChannels {
  private readonly server: net.Server;
  private readonly guests = new Map<number, GuestConnection>();
  private readonly bindings = new Map<string, Binding>();

  constructor(readonly socketPath: string) {
    this.server = net.createServer((socket) => new GuestConnection(socket, this));
  }

  listen(): Promise<void> {
    fs.rmSync(this.socketPath, { force: true });
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.socketPath, () => resolve());
    });
  }

  /** One connection per domain: a new hello replaces the older connection. */
  hello(c: GuestConnection): void {
    const older = this.guests.get(c.domid!);
    this.guests.set(c.domid!, c);
    if (older && older !== c) older.socket.destroy();
  }

  forget(c: GuestConnection): void {
    if (c.domid !== undefined && this.guests.get(c.domid) === c) this.guests.delete(c.domid);
  }

  raisedByGuest(domid: number, port: number): void {
    const b = this.bindings.get(`${domid}:${port}`);
    if (!b || b.scheduled) return; // nobody bound: dropped; already pending: coalesced
    b.scheduled = true;
    // After the whole chunk is parsed (ports repeated in it coalesce), still in this turn.
    queueMicrotask(() => {
      b.scheduled = false;
      if (this.bindings.get(`${domid}:${port}`) === b) b.onEvent();
    });
  }

  bind(domid: number, remotePort: number, onEvent: () => void): EventChannel {
    if (!Number.isInteger(remotePort) || remotePort <= 0 || remotePort > 0xffffffff) throw new Error(`event channel port ${remotePort} is not usable`);
    if (domid === 0) throw new Error('domain 0 cannot bind to itself');
    const key = `${domid}:${remotePort}`;
    if (this.bindings.has(key)) throw new Error(`event channel ${remotePort} of domain ${domid} is already bound`);
    const binding: Binding = { domid, port: remotePort, onEvent, scheduled: false };
    this.bindings.set(key, binding);
    return {
      remotePort,
      notify: () => this.guests.get(domid)?.deliver(remotePort),
      close: () => {
        if (this.bindings.get(key) === binding) this.bindings.delete(key);
      },
    };
  }

  close(): Promise<void> {
    for (const g of this.guests.values()) g.socket.destroy();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}
