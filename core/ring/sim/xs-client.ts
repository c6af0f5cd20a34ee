/**
 * A XenStore client speaking the wire protocol on a Unix socket (for the toolstack verbs
 * and the TypeScript test frontend; Xen's libxenstore does the same from C).
 */
import * as net from 'node:net';
import type { TxId, Watch, XenStore } from '../platform';
import { encodeMessage, MessageReader, nulTerminated, splitArgs, XS, type XsMessage } from './xs-wire';

export class XenStoreError extends Error {
  constructor(
    readonly code: string,
    readonly request: string,
  ) {
    super(`xenstore ${request}: ${code}`);
  }
}

export class XsClient implements XenStore {
  private readonly reader = new MessageReader();
  private nextReq = 1;
  private readonly waiting = new Map<number, { resolve(m: XsMessage): void; reject(e: Error): void }>();
  private readonly watchers = new Map<string, (path: string) => void>();
  private nextToken = 1;
  private failure?: Error;

  private constructor(private readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      for (const m of this.reader.push(chunk)) this.receive(m);
    });
    const fail = (e: Error) => {
      this.failure ??= e;
      for (const w of this.waiting.values()) w.reject(this.failure);
      this.waiting.clear();
    };
    socket.on('error', fail);
    socket.on('close', () => fail(new Error('xenstore connection closed')));
  }

  static connect(socketPath: string): Promise<XsClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(socketPath);
      socket.once('error', reject);
      socket.once('connect', () => {
        socket.off('error', reject);
        resolve(new XsClient(socket));
      });
    });
  }

  close(): void {
    this.socket.destroy();
  }

  private receive(m: XsMessage): void {
    if (m.type === XS.WATCH_EVENT) {
      const [path, token] = splitArgs(m.payload);
      this.watchers.get(token)?.(path);
      return;
    }
    const w = this.waiting.get(m.reqId);
    if (!w) return;
    this.waiting.delete(m.reqId);
    w.resolve(m);
  }

  /** Sends one request; resolves with the reply payload, rejects with XenStoreError on ERROR. */
  request(type: number, payload: Buffer, tx: TxId = 0): Promise<Buffer> {
    if (this.failure) return Promise.reject(this.failure);
    const reqId = this.nextReq++;
    return new Promise<XsMessage>((resolve, reject) => {
      this.waiting.set(reqId, { resolve, reject });
      this.socket.write(encodeMessage({ type, reqId, txId: tx, payload }));
    }).then((m) => {
      if (m.type === XS.ERROR) throw new XenStoreError(splitArgs(m.payload)[0], `${type} ${splitArgs(payload)[0]}`);
      return m.payload;
    });
  }

  async read(path: string, tx: TxId = 0): Promise<string | undefined> {
    try {
      return (await this.request(XS.READ, nulTerminated(path), tx)).toString('utf8');
    } catch (e) {
      if (e instanceof XenStoreError && e.code === 'ENOENT') return undefined;
      throw e;
    }
  }

  async write(path: string, value: string, tx: TxId = 0): Promise<void> {
    await this.request(XS.WRITE, Buffer.concat([nulTerminated(path), Buffer.from(value, 'utf8')]), tx);
  }

  async directory(path: string, tx: TxId = 0): Promise<string[]> {
    try {
      const payload = await this.request(XS.DIRECTORY, nulTerminated(path), tx);
      return payload.length === 0 ? [] : splitArgs(payload);
    } catch (e) {
      if (e instanceof XenStoreError && e.code === 'ENOENT') return [];
      throw e;
    }
  }

  async rm(path: string, tx: TxId = 0): Promise<void> {
    try {
      await this.request(XS.RM, nulTerminated(path), tx);
    } catch (e) {
      if (!(e instanceof XenStoreError && e.code === 'ENOENT')) throw e;
    }
  }

  async watch(path: string, onChange: (path: string) => void): Promise<Watch> {
    const token = `t${this.nextToken++}`;
    this.watchers.set(token, onChange);
    await this.request(XS.WATCH, nulTerminated(path, token));
    return {
      cancel: async () => {
        this.watchers.delete(token);
        await this.request(XS.UNWATCH, nulTerminated(path, token)).catch(() => undefined);
      },
    };
  }

  async transactionStart(): Promise<TxId> {
    return Number(splitArgs(await this.request(XS.TRANSACTION_START, nulTerminated('')))[0]);
  }

  async transactionEnd(tx: TxId, commit: boolean): Promise<boolean> {
    try {
      await this.request(XS.TRANSACTION_END, nulTerminated(commit ? 'T' : 'F'), tx);
      return true;
    } catch (e) {
      if (e instanceof XenStoreError && e.code === 'EAGAIN') return false;
      throw e;
    }
  }
}
