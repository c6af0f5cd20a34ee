/**
 * The daemon's control socket: a Unix socket, mode 0600, owned by the user running the
 * daemon, speaking the JSON-lines protocol of protocol.ts. A malformed request gets an
 * error answer; the daemon keeps running.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { BlockError, isBlockError } from '../errors';
import type { Logger } from './log';
import { LineReader, type ControlRequest, type ControlResponse } from './protocol';

export type ControlHandler = (request: ControlRequest) => Promise<unknown>;

export class ControlServer {
  private server?: net.Server;
  private readonly sockets = new Set<net.Socket>();

  constructor(
    readonly socketPath: string,
    private readonly handlers: Map<string, ControlHandler>,
    private readonly log: Logger,
  ) {}

  /** Listens, refusing to start when another daemon answers on the same socket. */
  async listen(): Promise<void> {
    fs.mkdirSync(path.dirname(this.socketPath), { recursive: true, mode: 0o700 });
    if (fs.existsSync(this.socketPath)) {
      if (await answers(this.socketPath)) {
        throw new BlockError('EBUSY', `another tapkit daemon is running on ${this.socketPath}`);
      }
      fs.unlinkSync(this.socketPath); // stale socket of a daemon that died
    }
    const server = net.createServer((socket) => this.serve(socket));
    this.server = server;
    // The socket is created with mode 0600: no window in which others may connect.
    const previous = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(this.socketPath, () => resolve());
      });
    } finally {
      process.umask(previous);
    }
    fs.chmodSync(this.socketPath, 0o600);
  }

  private serve(socket: net.Socket): void {
    this.sockets.add(socket);
    socket.on('close', () => this.sockets.delete(socket));
    socket.on('error', () => socket.destroy());
    // One request at a time per connection, answered in order.
    let queue = Promise.resolve();
    const reader = new LineReader(
      (line) => {
        queue = queue.then(() => this.answer(line).then((response) => void socket.write(`${JSON.stringify(response)}\n`)));
      },
      () => {
        this.log.warn('oversized control message refused');
        socket.end(`${JSON.stringify({ ok: false, error: { code: 'EFBIG', message: 'control message too long' } })}\n`);
        socket.destroy();
      },
    );
    socket.on('data', (chunk) => reader.push(chunk));
  }

  private async answer(line: string): Promise<ControlResponse> {
    let request: ControlRequest;
    try {
      request = JSON.parse(line);
    } catch {
      return { ok: false, error: { code: 'EINVAL', message: 'malformed JSON' } };
    }
    if (typeof request !== 'object' || request === null || Array.isArray(request)) {
      return { ok: false, error: { code: 'EINVAL', message: 'a request is a JSON object' } };
    }
    const id = request.id;
    const handler = typeof request.op === 'string' ? this.handlers.get(request.op) : undefined;
    if (!handler) {
      return { id, ok: false, error: { code: 'EINVAL', message: `unknown op ${JSON.stringify(request.op)} (known: ${[...this.handlers.keys()].join(', ')})` } };
    }
    try {
      return { id, ok: true, result: (await handler(request)) ?? null };
    } catch (e) {
      const code = isBlockError(e) ? (e as BlockError).code : 'EIO';
      const message = e instanceof Error ? e.message : String(e);
      this.log.warn('control request failed', { op: request.op, code, error: message });
      return { id, ok: false, error: { code, message } };
    }
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
    try {
      fs.unlinkSync(this.socketPath);
    } catch {
      /* already gone */
    }
  }
}

function answers(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.createConnection(socketPath);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
}

/** Field accessors that turn a missing or mistyped field into a clear EINVAL. */
export function field(request: ControlRequest, name: string, type: 'string'): string;
export function field(request: ControlRequest, name: string, type: 'string?'): string | undefined;
export function field(request: ControlRequest, name: string, type: 'strings?'): string[] | undefined;
export function field(request: ControlRequest, name: string, type: 'boolean?'): boolean | undefined;
export function field(request: ControlRequest, name: string, type: string): unknown {
  const value = request[name];
  const optional = type.endsWith('?');
  if (value === undefined && optional) return undefined;
  const base = type.replace('?', '');
  const ok =
    base === 'strings' ? Array.isArray(value) && value.every((v) => typeof v === 'string') : typeof value === base;
  if (!ok) throw new BlockError('EINVAL', `field '${name}' must be ${base === 'strings' ? 'an array of strings' : `a ${base}`}`);
  return value;
}
