/**
 * The `sim` platform's XenStore daemon: serves the Store on a Unix socket in the wire
 * protocol of Xen's xenstored, so `libxenstore` and the `xenstore-*` tools work with
 * `XENSTORED_PATH` pointing at it. Every connection acts as domain 0 (privileged). A
 * malformed message answers EINVAL, or closes that connection only.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import { checkPath, Store, StoreError, type WatchRegistration } from './store';
import { encodeMessage, MessageReader, nulTerminated, PAYLOAD_MAX, splitArgs, XS, type XsMessage } from './xs-wire';

const HOME = '/local/domain/0';

function absolute(path: string): string {
  if (path.startsWith('/')) return path;
  if (path === '') throw new StoreError('EINVAL', 'empty path');
  return `${HOME}/${path}`;
}

class Connection {
  private readonly reader = new MessageReader();
  private readonly watches = new Map<string, WatchRegistration>();
  private readonly transactions = new Set<number>();
  private closed = false;

  constructor(
    private readonly socket: net.Socket,
    private readonly store: Store,
  ) {
    socket.on('data', (chunk: Buffer) => this.receive(chunk));
    socket.on('error', () => this.close());
    socket.on('close', () => this.close());
  }

  private receive(chunk: Buffer): void {
    let messages: XsMessage[];
    try {
      messages = this.reader.push(chunk);
    } catch {
      this.socket.destroy();
      return;
    }
    for (const m of messages) {
      if (this.closed) return;
      this.handle(m);
    }
  }

  private send(m: XsMessage): void {
    if (!this.closed) this.socket.write(encodeMessage(m));
  }

  private reply(request: XsMessage, payload: Buffer, type = request.type): void {
    this.send({ type, reqId: request.reqId, txId: request.txId, payload });
  }

  private handle(m: XsMessage): void {
    try {
      const after = this.dispatch(m);
      after?.();
    } catch (e) {
      const code = e instanceof StoreError ? e.code : 'EINVAL';
      this.reply(m, nulTerminated(code), XS.ERROR);
    }
  }

  /** Serves one request; may return work to do after the reply is sent (a watch's first event). */
  private dispatch(m: XsMessage): (() => void) | void {
    const args = splitArgs(m.payload);
    const tx = m.txId;
    const ok = () => this.reply(m, nulTerminated('OK'));
    switch (m.type) {
      case XS.READ:
        return this.reply(m, this.store.read(absolute(args[0]), tx));
      case XS.DIRECTORY: {
        const payload = Buffer.from(this.store.directory(absolute(args[0]), tx).map((c) => `${c}\0`).join(''));
        if (payload.length > PAYLOAD_MAX) throw new StoreError('E2BIG');
        return this.reply(m, payload);
      }
      case XS.GET_PERMS:
        return this.reply(m, nulTerminated(...this.store.getPerms(absolute(args[0]), tx)));
      case XS.WRITE: {
        const nul = m.payload.indexOf(0);
        if (nul < 0) throw new StoreError('EINVAL');
        this.store.write(absolute(m.payload.subarray(0, nul).toString('utf8')), Buffer.from(m.payload.subarray(nul + 1)), tx);
        return ok();
      }
      case XS.MKDIR:
        this.store.mkdir(absolute(args[0]), tx);
        return ok();
      case XS.RM:
        this.store.rm(absolute(args[0]), tx);
        return ok();
      case XS.SET_PERMS:
        this.store.setPerms(absolute(args[0]), args.slice(1), tx);
        return ok();
      case XS.WATCH:
        return this.watch(m, args);
      case XS.UNWATCH: {
        if (args.length < 2) throw new StoreError('EINVAL');
        const key = `${args[0]}\0${args[1]}`;
        const w = this.watches.get(key);
        if (!w) throw new StoreError('ENOENT');
        this.store.unwatch(w);
        this.watches.delete(key);
        return ok();
      }
      case XS.TRANSACTION_START: {
        if (tx !== 0) throw new StoreError('EINVAL', 'nested transaction');
        const id = this.store.transactionStart();
        this.transactions.add(id);
        return this.reply(m, nulTerminated(String(id)));
      }
      case XS.TRANSACTION_END: {
        if (args[0] !== 'T' && args[0] !== 'F') throw new StoreError('EINVAL');
        if (!this.transactions.has(tx)) throw new StoreError('ENOENT');
        this.transactions.delete(tx);
        this.store.transactionEnd(tx, args[0] === 'T');
        return ok();
      }
      case XS.GET_DOMAIN_PATH: {
        if (!/^\d+$/.test(args[0] ?? '')) throw new StoreError('EINVAL');
        return this.reply(m, nulTerminated(`/local/domain/${Number(args[0])}`));
      }
      case XS.RESET_WATCHES:
        for (const w of this.watches.values()) this.store.unwatch(w);
        this.watches.clear();
        return ok();
      default:
        throw new StoreError('ENOSYS');
    }
  }

  private watch(m: XsMessage, args: string[]): () => void {
    if (args.length < 2) throw new StoreError('EINVAL');
    const [given, token] = args;
    const key = `${given}\0${token}`;
    if (this.watches.has(key)) throw new StoreError('EEXIST');
    const relative = !given.startsWith('/') && !given.startsWith('@');
    const registration: WatchRegistration = {
      path: given.startsWith('@') ? given : absolute(given),
      fire: (path) => {
        const shown = relative && path.startsWith(`${HOME}/`) ? path.slice(HOME.length + 1) : path;
        this.send({ type: XS.WATCH_EVENT, reqId: 0, txId: 0, payload: nulTerminated(shown, token) });
      },
    };
    if (!given.startsWith('@')) checkPath(registration.path);
    this.watches.set(key, registration);
    this.reply(m, nulTerminated('OK'));
    return () => {
      // Special paths (@introduceDomain, @releaseDomain) fire once and never again here.
      if (given.startsWith('@')) registration.fire(given);
      else this.store.watch(registration);
    };
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const w of this.watches.values()) this.store.unwatch(w);
    this.watches.clear();
    this.store.abortTransactions(this.transactions);
    this.transactions.clear();
    this.socket.destroy();
  }
}

export class XenStoreDaemon {
  private readonly server: net.Server;
  private readonly connections = new Set<Connection>();

  constructor(
    readonly store: Store,
    readonly socketPath: string,
  ) {
    this.server = net.createServer((socket) => {
      const c = new Connection(socket, store);
      this.connections.add(c);
      socket.on('close', () => this.connections.delete(c));
    });
  }

  listen(): Promise<void> {
    fs.rmSync(this.socketPath, { force: true });
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.socketPath, () => resolve());
    });
  }

  close(): Promise<void> {
    for (const c of this.connections) c.close();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}
