/**
 * A deliberately low-level NBD client for tests that must send what real clients never
 * do (bad magic, truncated messages, floods) and look at the exact bytes that come back.
 */
import * as net from 'node:net';

export const IHAVEOPT = Buffer.from('IHAVEOPT');
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;

export class RawClient {
  private buffered: Buffer = Buffer.alloc(0);
  private waiter: (() => void) | undefined;
  closed = false;
  readonly whenClosed: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (d) => {
      this.buffered = Buffer.concat([this.buffered, d]);
      this.waiter?.();
    });
    socket.on('error', () => {});
    this.whenClosed = new Promise((resolve) =>
      socket.once('close', () => {
        this.closed = true;
        this.waiter?.();
        resolve();
      }),
    );
  }

  /** Connects to a Unix socket path or a `host:port`. */
  static connect(target: { path: string } | { host: string; port: number }): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const socket = 'path' in target ? net.connect(target.path) : net.connect(target.port, target.host);
      socket.once('connect', () => resolve(new RawClient(socket)));
      socket.once('error', reject);
    });
  }

  /** The next `n` bytes; rejects if the server closes first or nothing comes within `ms`. */
  async read(n: number, ms = 20_000): Promise<Buffer> {
    const deadline = Date.now() + ms;
    while (this.buffered.length < n) {
      if (this.closed) throw new Error(`server closed the connection (wanted ${n} bytes, have ${this.buffered.length})`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no ${n} bytes within ${ms} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.waiter = undefined;
    }
    const out = this.buffered.subarray(0, n);
    this.buffered = this.buffered.subarray(n);
    return out;
  }

  write(data: Buffer): void {
    this.socket.write(data);
  }

  /** Resolves true when the server closes the connection within `ms`. */
  async closedWithin(ms: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
    const result = await Promise.race([this.whenClosed.then(() => true), timeout]);
    clearTimeout(timer);
    return result;
  }

  destroy(): void {
    this.socket.destroy();
  }

  // ---- protocol pieces ----------------------------------------------------------------

  /** Reads the 18-byte greeting and answers with client flags. */
  async greet(clientFlags = 3): Promise<Buffer> {
    const greeting = await this.read(18);
    this.write(u32(clientFlags));
    return greeting;
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    this.write(Buffer.concat([IHAVEOPT, u32(option), u32(data.length), data]));
  }

  async readOptionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const header = await this.read(20);
    if (header.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new Error('bad option reply magic');
    const length = header.readUInt32BE(16);
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), data: await this.read(length) };
  }

  /** GO on an export, reading replies up to the ACK. Returns the size. */
  async go(name = '', structured = false): Promise<number> {
    if (structured) {
      this.sendOption(8);
      const ack = await this.readOptionReply();
      if (ack.type !== 1) throw new Error('STRUCTURED_REPLY refused');
    }
    const nameBytes = Buffer.from(name);
    this.sendOption(7, Buffer.concat([u32(nameBytes.length), nameBytes, u16(0)]));
    let size = -1;
    for (;;) {
      const reply = await this.readOptionReply();
      if (reply.type === 3 && reply.data.readUInt16BE(0) === 0) size = Number(reply.data.readBigUInt64BE(2));
      if (reply.type === 1) return size;
      if (reply.type !== 3) throw new Error(`GO failed with reply type 0x${reply.type.toString(16)}`);
    }
  }

  sendRequest(type: number, offset: number, length: number, cookie: bigint, flags = 0, payload?: Buffer): void {
    const header = Buffer.alloc(28);
    header.writeUInt32BE(0x25609513, 0);
    header.writeUInt16BE(flags, 4);
    header.writeUInt16BE(type, 6);
    header.writeBigUInt64BE(cookie, 8);
    header.writeBigUInt64BE(BigInt(offset), 16);
    header.writeUInt32BE(length, 24);
    this.write(payload ? Buffer.concat([header, payload]) : header);
  }

  /** A simple reply: error and cookie (data, if any, is left for the caller). */
  async readSimpleReply(): Promise<{ error: number; cookie: bigint }> {
    const reply = await this.read(16);
    if (reply.readUInt32BE(0) !== 0x67446698) throw new Error(`not a simple reply: magic 0x${reply.readUInt32BE(0).toString(16)}`);
    return { error: reply.readUInt32BE(4), cookie: reply.readBigUInt64BE(8) };
  }

  /** One structured reply chunk. */
  async readChunk(): Promise<{ flags: number; type: number; cookie: bigint; payload: Buffer }> {
    const header = await this.read(20);
    if (header.readUInt32BE(0) !== 0x668e33ef) throw new Error(`not a structured chunk: magic 0x${header.readUInt32BE(0).toString(16)}`);
    return { flags: header.readUInt16BE(4), type: header.readUInt16BE(6), cookie: header.readBigUInt64BE(8), payload: await this.read(header.readUInt32BE(16)) };
  }
}

export function u32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value, 0);
  return b;
}

export function u16(value: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(value, 0);
  return b;
}
