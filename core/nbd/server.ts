/**
 * An embeddable NBD server: named VBDs in, a listening Unix or TCP socket out.
 *
 *   const server = new NbdServer({ exports: [{ name: '', vbd }] });
 *   await server.listen({ path: '/run/tapkit/nbd.sock' });
 *   ...
 *   await server.close();   // stop accepting, finish running requests, close sockets
 *
 * The server does not own the VBDs: whoever made them flushes and closes them after
 * `close()` (several servers, or other exports, may share one VBD).
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { NbdConnection } from './connection';
import type { NbdExport } from './export';
import { DEFAULT_LIMITS, type TransmissionLimits } from './transmission';

export interface NbdTlsOptions {
  /** PEM certificate chain and private key of the server. */
  cert: string | Buffer;
  key: string | Buffer;
  /** PEM CA: when given, clients must present a certificate it signed. */
  ca?: string | Buffer;
}

export interface NbdServerOptions {
  exports: NbdExport[];
  /** When set, TLS is required: only STARTTLS and ABORT are accepted before it. */
  tls?: NbdTlsOptions;
  /** Largest READ/WRITE payload in bytes (default 32 MiB). */
  maxRequest?: number;
  /** Clients served at once; more are disconnected on arrival (default 64). */
  maxConnections?: number;
  /** Requests of one connection running at once (default 64). */
  maxInFlight?: number;
  /** Options accepted in one handshake (default 256). */
  maxOptions?: number;
  /** Milliseconds a client may spend in the handshake (default 30 s). */
  handshakeTimeout?: number;
  /** Where connection-level problems are reported (default: nowhere). */
  log?: (message: string) => void;
}

export type ListenTarget = { path: string } | { host: string; port: number };

export class NbdServer {
  private readonly exports = new Map<string, NbdExport>();
  private readonly connections = new Set<NbdConnection>();
  private readonly listeners: net.Server[] = [];
  private readonly limits: TransmissionLimits;
  private readonly secureContext: tls.SecureContext | undefined;
  private closing: Promise<void> | undefined;
  private readonly log: (message: string) => void;

  constructor(private readonly options: NbdServerOptions) {
    for (const exp of options.exports) {
      if (this.exports.has(exp.name)) throw new Error(`export name '${exp.name}' is used twice`);
      if (Buffer.byteLength(exp.name) > 4096) throw new Error('export names are at most 4096 bytes');
      this.exports.set(exp.name, exp);
    }
    const maxRequest = options.maxRequest ?? DEFAULT_LIMITS.maxRequest;
    if (!Number.isInteger(maxRequest) || maxRequest < 4096 || maxRequest > 0xffffffff) {
      throw new Error(`maximum request size must be between 4096 and 4294967295 bytes (got ${maxRequest})`);
    }
    this.limits = {
      maxRequest,
      maxInFlight: options.maxInFlight ?? DEFAULT_LIMITS.maxInFlight,
      maxInFlightBytes: Math.max(DEFAULT_LIMITS.maxInFlightBytes, 2 * maxRequest),
      maxQueuedReplyBytes: Math.max(DEFAULT_LIMITS.maxQueuedReplyBytes, maxRequest + 1024),
    };
    if (options.tls) {
      this.secureContext = tls.createSecureContext({ cert: options.tls.cert, key: options.tls.key, ca: options.tls.ca });
    }
    this.log = options.log ?? (() => {});
  }

  /** The exports by name. */
  get exportList(): NbdExport[] {
    return [...this.exports.values()];
  }

  get tls(): boolean {
    return this.secureContext !== undefined;
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** Starts listening; resolves with the address (the actual port when `port` is 0). */
  async listen(target: ListenTarget): Promise<string | net.AddressInfo> {
    const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: false }, (socket) => this.accept(socket));
    if ('path' in target) await removeStaleSocket(target.path);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      const ready = () => {
        server.removeListener('error', reject);
        resolve();
      };
      if ('path' in target) server.listen(target.path, ready);
      else server.listen(target.port, target.host, ready);
    });
    server.on('error', (e) => this.log(`listener: ${e.message}`));
    this.listeners.push(server);
    const address = server.address();
    if (address === null) throw new Error('listener has no address');
    return address;
  }

  /**
   * Graceful stop: no new clients; every connection answers the requests it is running and
   * closes; clients still haggling are dropped. Resolves when every socket is closed.
   */
  close(): Promise<void> {
    this.closing ??= (async () => {
      // net.Server.close() calls back only once every connection is gone: stop accepting,
      // then shut the connections down, then wait for both.
      const listenersClosed = this.listeners.map((l) => new Promise<void>((resolve) => l.close(() => resolve())));
      await Promise.all([...this.connections].map((c) => c.shutdown()));
      await Promise.all(listenersClosed);
    })();
    return this.closing;
  }

  private accept(socket: net.Socket): void {
    socket.on('error', () => {}); // until the connection takes over
    if (this.closing || this.connections.size >= (this.options.maxConnections ?? 64)) {
      this.log(`refusing a client: ${this.closing ? 'shutting down' : `already ${this.connections.size} connections`}`);
      socket.destroy();
      return;
    }
    const connection = new NbdConnection(socket, {
      policy: {
        exports: this.exports,
        tls: this.secureContext !== undefined,
        maxRequest: this.limits.maxRequest,
        maxOptions: this.options.maxOptions ?? 256,
      },
      limits: this.limits,
      tls: this.secureContext ? { context: this.secureContext, requireClientCert: this.options.tls?.ca !== undefined } : undefined,
      handshakeTimeout: this.options.handshakeTimeout ?? 30_000,
      log: this.log,
    });
    this.connections.add(connection);
    void connection.serve().finally(() => this.connections.delete(connection));
  }
}

/** Removes a Unix socket file nobody listens on any more; refuses to steal a live one. */
async function removeStaleSocket(path: string): Promise<void> {
  let stat: fs.Stats;
  try {
    stat = fs.statSync(path);
  } catch {
    return;
  }
  if (!stat.isSocket()) throw new Error(`${path} exists and is not a socket`);
  const live = await new Promise<boolean>((resolve) => {
    const probe = net.connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (live) throw new Error(`another server is listening on ${path}`);
  fs.unlinkSync(path);
}
