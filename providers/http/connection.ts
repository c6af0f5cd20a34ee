/**
 * HTTP/1.1 connections for the http source: one exchange at a time per connection,
 * keep-alive, plain TCP or TLS, pooled per origin.
 *
 * Why not a general client: a disk reads megabytes per request, and what it costs is what
 * happens to each body byte. Here the socket reads (net's and tls's `onread`, with the
 * buffer chosen before every read) land a Content-Length body straight in the caller's
 * buffers: no chunk is allocated, copied or collected. undici, which the source used
 * before, spent three to four times the CPU per GiB on the same 1 MiB ranges (each chunk a
 * fresh 64 KiB buffer, copied into the parser's memory and again into the destination).
 *
 * What it understands of HTTP/1.1: status line and headers (at most HEAD_LIMIT bytes),
 * 1xx answers skipped, bodies framed by Content-Length, chunked transfer coding, or the
 * end of the connection; HEAD, 204 and 304 have none; `Connection: close`, HTTP/1.0 and
 * `Keep-Alive: timeout=N` decide whether and how long a connection is kept. Through an
 * http proxy (proxy.ts): http requests in absolute form, https inside a CONNECT tunnel.
 * Redirects, retries and timeouts are the caller's (client.ts).
 */
import * as net from 'node:net';
import * as tls from 'node:tls';
import { connectRequest, ProxyRefusedError, type Proxy } from './proxy';

/** Response headers, names in lower case; a repeated header keeps every value. */
export type ResponseHeaders = Record<string, string | string[]>;

/** Where a body is written: buffers filled in order, as if they were one. */
export interface BodySink {
  /** Bytes the sink can still take. */
  readonly remaining: number;
  /** The free part of the current buffer, at most `max` bytes (never empty while `remaining` > 0). */
  window(max: number): Uint8Array;
  /** `n` bytes were written at the start of the last window. */
  advance(n: number): void;
  /** Copies bytes that arrived elsewhere (chunked bodies) to where the last ones ended. */
  put(bytes: Uint8Array): void;
}

/**
 * What to do with a body, decided when the headers arrive: write it into a sink, read and
 * drop it (small error bodies: keeps the connection), or stop right away (the connection
 * is closed and the exchange ends as if the body had been read).
 */
export type BodyPlan = BodySink | 'drop' | 'abort';

export interface Exchange {
  method: 'GET' | 'HEAD';
  /** Path and query. */
  path: string;
  /** Request headers besides Host (lower-case names). */
  headers: Record<string, string>;
  onHead(status: number, headers: ResponseHeaders): BodyPlan;
  /** The body was read (or dropped, or stopped as planned). */
  onEnd(): void;
  /** Called at most once, never after onEnd. */
  onError(error: Error): void;
}

/** A response that breaks HTTP/1.1 (bad status line, headers too large, body longer than asked). */
export class ProtocolError extends Error {
  readonly code = 'EPROTO';
}

/** Status line and headers larger than this are refused (Node's own HTTP client allows 16 KiB). */
export const HEAD_LIMIT = 64 * 1024;
/** Error bodies longer than this are not read: the connection is closed instead. */
const DROP_LIMIT = 64 * 1024;
/** How long an idle connection is kept, unless the server's Keep-Alive asks for less. */
const IDLE_MS = 4000;
const CRLF2 = Buffer.from('\r\n\r\n');

export interface PoolOptions {
  connections: number;
  /** PEM CAs to trust instead of Node's defaults (https only). */
  ca?: string[];
  /** The http proxy to reach the origin through (proxy.ts chooses it). */
  proxy?: Proxy;
}

/** An exchange waiting for a connection, and how to start it on one. */
type Waiting = Exchange & { start(): void };

/** The keep-alive connections to one origin; exchanges beyond `connections` wait in order. */
export class ConnectionPool {
  private readonly idle: Connection[] = [];
  private readonly all = new Set<Connection>();
  private readonly waiting: Waiting[] = [];
  private destroyed = false;

  constructor(
    private readonly origin: URL,
    private readonly options: PoolOptions,
  ) {}

  /** Starts an exchange; the returned function cancels it (its onError gets `reason`). */
  dispatch(exchange: Exchange): (reason: Error) => void {
    let connection: Connection | undefined;
    let settled = false;
    const tracked: Waiting = {
      ...exchange,
      start: () => {
        connection = this.connectionFor();
        connection.run(tracked, (reusable) => this.release(connection!, reusable));
      },
      onEnd: () => {
        if (settled) return;
        settled = true;
        exchange.onEnd();
      },
      onError: (e) => {
        if (settled) return;
        settled = true;
        exchange.onError(e);
      },
    };
    if (this.destroyed) queueMicrotask(() => tracked.onError(new Error('the pool is closed')));
    else {
      this.waiting.push(tracked);
      this.startWaiting();
    }
    return (reason) => {
      if (settled) return;
      settled = true;
      const queued = this.waiting.indexOf(tracked);
      if (queued >= 0) this.waiting.splice(queued, 1);
      connection?.fail(reason);
      exchange.onError(reason);
    };
  }

  /** Closes every connection; exchanges in flight or waiting fail. */
  destroy(): void {
    this.destroyed = true;
    const closed = new Error('the pool is closed');
    for (const waiting of this.waiting.splice(0)) waiting.onError(closed);
    for (const connection of [...this.all]) connection.fail(closed);
  }

  private connectionFor(): Connection {
    const reused = this.idle.pop();
    if (reused) return reused;
    const connection = new Connection(this.origin, this.options, () => {
      this.all.delete(connection);
      const at = this.idle.indexOf(connection);
      if (at >= 0) this.idle.splice(at, 1);
      this.startWaiting();
    });
    this.all.add(connection);
    return connection;
  }

  private release(connection: Connection, reusable: boolean): void {
    if (reusable && !this.destroyed) this.idle.push(connection);
    else connection.destroy();
    this.startWaiting();
  }

  private startWaiting(): void {
    while (this.waiting.length > 0 && !this.destroyed && (this.idle.length > 0 || this.all.size < this.options.connections)) {
      this.waiting.shift()!.start();
    }
  }
}

type Framing = { kind: 'none' } | { kind: 'length'; left: number } | { kind: 'chunked' } | { kind: 'close' };

/** One socket; `run` carries one exchange at a time. */
class Connection {
  private socket: net.Socket | tls.TLSSocket | undefined;
  /** Status line and headers collect here; also the scratch buffer for dropped and chunked bodies. */
  private readonly head = Buffer.allocUnsafe(HEAD_LIMIT);
  private headLength = 0;
  private state: 'idle' | 'head' | 'body' = 'idle';
  private exchange: Exchange | undefined;
  private done: ((reusable: boolean) => void) | undefined;
  private plan: BodyPlan = 'drop';
  private framing: Framing = { kind: 'none' };
  private dropped = 0;
  private chunked = new ChunkedDecoder();
  private keep = true;
  private idleMs = IDLE_MS;
  private idleTimer: NodeJS.Timeout | undefined;
  /** Set once a response byte arrived on this connection (a stale keep-alive socket has none). */
  private answered = false;
  private closed = false;
  private retriedStale = false;

  constructor(
    private readonly origin: URL,
    private readonly options: PoolOptions,
    private readonly onClosed: () => void,
  ) {}

  run(exchange: Exchange, done: (reusable: boolean) => void): void {
    clearTimeout(this.idleTimer);
    this.exchange = exchange;
    this.done = done;
    this.state = 'head';
    this.headLength = 0;
    this.keep = true;
    const reused = this.socket !== undefined;
    this.answered = false;
    let request: string;
    try {
      request = requestHead(exchange, this.origin, this.options.proxy);
    } catch (e) {
      this.fail(e as Error);
      return;
    }
    this.retriedStale = !reused;
    if (this.socket) this.socket.write(request, 'latin1');
    else this.connect(request);
  }

  destroy(): void {
    clearTimeout(this.idleTimer);
    if (this.closed) return;
    this.closed = true;
    this.socket?.destroy();
    this.onClosed();
  }

  /** Opens the socket (through the proxy if there is one) and sends `request` on it. */
  private connect(request: string): void {
    const proxy = this.options.proxy;
    const https = this.origin.protocol === 'https:';
    if (proxy && https) return this.tunnel(proxy, request);
    const [host, port] = proxy ? hostAndPort(proxy.url) : hostAndPort(this.origin);
    const onread = this.onread();
    const socket = https
      ? // tls sockets honour onread too (Node's types only declare it for net).
        tls.connect({ ...this.tlsOptions(), port, onread } as tls.ConnectionOptions)
      : net.connect({ host, port, onread });
    this.attach(socket);
    socket.write(request, 'latin1');
  }

  /** Bytes that arrived as a 'data' chunk: copied where onread would have read them. */
  private receivedChunk(chunk: Buffer): void {
    for (let at = 0; at < chunk.length && !this.closed; ) {
      const into = this.nextBuffer();
      const n = Math.min(into.length, chunk.length - at);
      if (n === 0) return this.fail(new ProtocolError('no room for the bytes the server sent'));
      into.set(chunk.subarray(at, at + n));
      at += n;
      this.received(n);
    }
  }

  private onread() {
    return { buffer: () => this.nextBuffer(), callback: (n: number) => this.received(n) };
  }

  private tlsOptions(): tls.ConnectionOptions {
    const [host] = hostAndPort(this.origin);
    // host: the name the certificate must carry (also through a tunnel, where the socket is the proxy's).
    return { host, servername: net.isIP(host) ? undefined : host, ca: this.options.ca, ALPNProtocols: ['http/1.1'] };
  }

  private attach(socket: net.Socket): void {
    socket.setNoDelay(true);
    const lost = (e: Error) => {
      if (socket === this.socket) this.lost(e);
    };
    socket.on('error', lost);
    socket.on('end', () => lost(Object.assign(new Error('the server closed the connection'), { code: 'ECONNRESET' })));
    socket.on('close', () => lost(Object.assign(new Error('the connection closed'), { code: 'ECONNRESET' })));
    this.socket = socket;
    socket.resume();
  }

  /**
   * An https origin through an http proxy: CONNECT, read the proxy's answer, then TLS with
   * the origin over the same socket. Until the tunnel stands, `socket` is the plain one (so
   * a timeout or close destroys it) and the request waits.
   */
  private tunnel(proxy: Proxy, request: string): void {
    const [host, port] = hostAndPort(proxy.url);
    const plain = net.connect({ host, port });
    plain.setNoDelay(true);
    this.socket = plain;
    const lost = (e: Error) => {
      if (plain === this.socket) this.lost(e);
    };
    const closed = () => lost(Object.assign(new Error('the proxy closed the connection'), { code: 'ECONNRESET' }));
    let answer = Buffer.alloc(0);
    const onData = (data: Buffer) => {
      answer = Buffer.concat([answer, data]);
      const end = answer.indexOf(CRLF2);
      if (end < 0) {
        if (answer.length > HEAD_LIMIT) this.fail(new ProtocolError(`the proxy's answer to CONNECT is longer than ${HEAD_LIMIT / 1024} KiB`));
        return;
      }
      plain.off('data', onData).off('error', lost).off('end', closed).off('close', closed);
      try {
        const { status, reason } = parseResponseHead(answer.toString('latin1', 0, end));
        if (status < 200 || status > 299) throw new ProxyRefusedError(status, reason.slice(0, 80), proxy, this.origin);
        // The origin speaks first only after our TLS hello: anything more is not a tunnel.
        if (answer.length > end + 4) throw new ProtocolError('the proxy sent bytes after its answer to CONNECT');
      } catch (e) {
        this.fail(e as Error);
        return;
      }
      // Node ignores onread for a TLS socket made over an existing one: its 'data' chunks
      // are copied into the buffers onread would have offered.
      const secure = tls.connect({ socket: plain, ...this.tlsOptions() });
      secure.on('data', (chunk: Buffer) => this.receivedChunk(chunk));
      this.attach(secure);
      secure.write(request, 'latin1');
    };
    plain.on('data', onData).on('error', lost).on('end', closed).on('close', closed);
    plain.write(connectRequest(this.origin, proxy), 'latin1');
  }

  /** Where the next socket read goes: the caller's buffer while a sized body comes in, else our own. */
  private nextBuffer(): Uint8Array {
    if (this.state === 'body' && this.framing.kind !== 'chunked' && typeof this.plan === 'object') {
      const max = this.framing.kind === 'length' ? this.framing.left : Number.MAX_SAFE_INTEGER;
      if (this.plan.remaining > 0 && max > 0) {
        this.window = this.plan.window(max);
        return this.window;
      }
    }
    this.window = undefined;
    return this.state === 'head' ? this.head.subarray(this.headLength) : this.head;
  }

  private window: Uint8Array | undefined;

  /** `n` bytes arrived in the buffer nextBuffer gave. */
  private received(n: number): boolean {
    if (this.closed) return false;
    this.answered = true;
    try {
      if (this.window) {
        (this.plan as BodySink).advance(n);
        if (this.framing.kind === 'length') this.framing.left -= n;
        this.checkBodyEnd();
      } else if (this.state === 'head') {
        this.headLength += n;
        this.parseHead();
      } else if (this.state === 'body') {
        this.bodyBytes(this.head.subarray(0, n));
      } else {
        // Bytes nobody asked for: the connection cannot be trusted any more.
        this.destroy();
      }
    } catch (e) {
      this.fail(e as Error);
    }
    return true;
  }

  private parseHead(): void {
    for (;;) {
      const end = this.head.subarray(0, this.headLength).indexOf(CRLF2);
      if (end < 0) {
        if (this.headLength >= HEAD_LIMIT) throw new ProtocolError(`response headers longer than ${HEAD_LIMIT / 1024} KiB`);
        return;
      }
      const { status, version, headers } = parseResponseHead(this.head.toString('latin1', 0, end));
      const rest = this.head.subarray(end + 4, this.headLength);
      if (status < 200) {
        if (status === 101) throw new ProtocolError('the server switched protocols');
        this.head.copy(this.head, 0, end + 4, this.headLength);
        this.headLength = rest.length;
        continue;
      }
      // Bytes past an answer without a body would be taken for the next answer: not kept alive then.
      this.startBody(status, version, headers, rest.length > 0);
      this.headLength = 0;
      // Body bytes that came with the head are used where they are: the head buffer is
      // not read into again before this callback returns.
      if (rest.length > 0 && this.state === 'body') this.bodyBytes(rest);
      else if (rest.length > 0 && this.state === 'idle') this.destroy();
      return;
    }
  }

  private startBody(status: number, version: string, headers: ResponseHeaders, bytesFollow: boolean): void {
    const exchange = this.exchange!;
    const connection = first(headers.connection)?.toLowerCase() ?? '';
    this.keep = version === '1.1' ? !/\bclose\b/.test(connection) : /\bkeep-alive\b/.test(connection);
    const hint = /\btimeout=(\d+)/i.exec(first(headers['keep-alive']) ?? '');
    this.idleMs = hint ? Math.min(IDLE_MS, Math.max(0, Number(hint[1]) * 1000 - 1000)) : IDLE_MS;
    const length = first(headers['content-length']);
    const coding = first(headers['transfer-encoding'])?.toLowerCase();
    if (exchange.method === 'HEAD' || status === 204 || status === 304) this.framing = { kind: 'none' };
    else if (coding && /\bchunked\s*$/.test(coding)) this.framing = { kind: 'chunked' };
    else if (length !== undefined) {
      if (!/^\d+$/.test(length.trim()) || !Number.isSafeInteger(Number(length))) throw new ProtocolError(`bad Content-Length '${length}'`);
      if (Array.isArray(headers['content-length']) && new Set(headers['content-length'].map((v) => v.trim())).size > 1) throw new ProtocolError('conflicting Content-Length headers');
      this.framing = { kind: 'length', left: Number(length) };
    } else this.framing = { kind: 'close' };
    if (this.framing.kind === 'close' || (this.framing.kind === 'none' && bytesFollow)) this.keep = false;
    this.plan = exchange.onHead(status, headers);
    this.dropped = 0;
    this.chunked = new ChunkedDecoder();
    if (this.plan === 'abort') return this.finish(false);
    if (typeof this.plan === 'object' && this.framing.kind === 'length' && this.framing.left > this.plan.remaining) {
      throw new ProtocolError(`the server sent a body of ${this.framing.left} bytes; the range asked for ${this.plan.remaining}`);
    }
    this.state = 'body';
    this.checkBodyEnd();
  }

  /** Body bytes that arrived in our own buffer. */
  private bodyBytes(bytes: Uint8Array): void {
    if (this.framing.kind === 'chunked') {
      const finished = this.chunked.feed(bytes, (data) => this.keepBody(data));
      if (finished) this.finish(this.keep);
      return;
    }
    if (this.framing.kind === 'length') {
      if (bytes.length > this.framing.left) {
        // More than the body: the start of an answer nobody asked for.
        this.keep = false;
        bytes = bytes.subarray(0, this.framing.left);
      }
      this.framing.left -= bytes.length;
    }
    this.keepBody(bytes);
    this.checkBodyEnd();
  }

  private keepBody(data: Uint8Array): void {
    if (typeof this.plan === 'object') {
      if (data.length > this.plan.remaining) throw new ProtocolError('the server sent more bytes than the range asked for');
      this.plan.put(data);
    } else {
      this.dropped += data.length;
      if (this.dropped > DROP_LIMIT) this.finish(false);
    }
  }

  private checkBodyEnd(): void {
    if (this.state !== 'body') return;
    if (this.framing.kind === 'none' || (this.framing.kind === 'length' && this.framing.left === 0)) this.finish(this.keep);
  }

  /** The exchange ended well; the connection goes back to the pool or is closed. */
  private finish(reusable: boolean): void {
    const exchange = this.exchange;
    const done = this.done;
    this.reset();
    if (!reusable) this.destroy();
    else this.idleTimer = setTimeout(() => this.destroy(), this.idleMs).unref();
    done?.(reusable);
    exchange?.onEnd();
  }

  /** Ends the exchange running here (if any) with `error` and closes the connection. */
  fail(error: Error): void {
    const exchange = this.exchange;
    const done = this.done;
    this.reset();
    this.destroy();
    done?.(false);
    exchange?.onError(error);
  }

  /** The socket ended or failed. */
  private lost(error: Error): void {
    if (this.closed) return;
    const exchange = this.exchange;
    if (exchange && this.state === 'body' && this.framing.kind === 'close' && !(error as NodeJS.ErrnoException).code?.startsWith('ERR_TLS')) {
      // A body framed by the end of the connection has just ended.
      this.finish(false);
      return;
    }
    if (exchange && !this.answered && !this.retriedStale) {
      // A kept-alive connection the server had closed meanwhile: try once on a fresh one.
      this.retriedStale = true;
      this.socket?.destroy();
      this.socket = undefined;
      this.run(exchange, this.done!);
      return;
    }
    if (exchange) this.fail(error);
    else this.destroy();
  }

  private reset(): void {
    this.exchange = undefined;
    this.done = undefined;
    this.state = 'idle';
    this.window = undefined;
    this.plan = 'drop';
  }
}

/** Decodes `Transfer-Encoding: chunked` incrementally. */
export class ChunkedDecoder {
  private phase: 'size' | 'data' | 'data-end' | 'trailer' | 'done' = 'size';
  private line = '';
  private left = 0;

  /** Feeds bytes; `data` gets the body's pieces. True once the last chunk and trailer are in. */
  feed(bytes: Uint8Array, data: (piece: Uint8Array) => void): boolean {
    let at = 0;
    while (at < bytes.length && this.phase !== 'done') {
      if (this.phase === 'data') {
        const n = Math.min(this.left, bytes.length - at);
        data(bytes.subarray(at, at + n));
        at += n;
        this.left -= n;
        if (this.left === 0) this.phase = 'data-end';
        continue;
      }
      const newline = bytes.indexOf(10, at);
      const end = newline < 0 ? bytes.length : newline;
      this.line += Buffer.from(bytes.buffer, bytes.byteOffset + at, end - at).toString('latin1');
      if (this.line.length > 4096) throw new ProtocolError('a chunk-size or trailer line longer than 4 KiB');
      at = end;
      if (newline < 0) break;
      at++;
      const line = this.line.replace(/\r$/, '');
      this.line = '';
      if (this.phase === 'size') {
        const m = /^([0-9a-fA-F]{1,13})(?:\s*;.*)?$/.exec(line.trim());
        if (!m) throw new ProtocolError(`bad chunk size line '${line.slice(0, 40)}'`);
        this.left = parseInt(m[1], 16);
        this.phase = this.left === 0 ? 'trailer' : 'data';
      } else if (this.phase === 'data-end') {
        if (line !== '') throw new ProtocolError('a chunk not followed by CRLF');
        this.phase = 'size';
      } else if (line === '') {
        this.phase = 'done';
      }
    }
    return this.phase === 'done';
  }
}

function first(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value[0] : value;
}

const TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

/** `[host, port]` to connect to for a URL (IPv6 brackets removed, default ports filled in). */
function hostAndPort(u: URL): [string, number] {
  return [u.hostname.replace(/^\[(.*)\]$/, '$1'), Number(u.port) || (u.protocol === 'https:' ? 443 : 80)];
}

/**
 * The request line and headers, refusing anything that could split the request. Through
 * a proxy, an http request names the whole URL (absolute form) and carries the proxy's
 * credentials; an https one goes through a tunnel and looks as it would without one.
 */
export function requestHead(exchange: Pick<Exchange, 'method' | 'path' | 'headers'>, origin: URL, proxy?: Proxy): string {
  if (/[\s\x00-\x1f\x7f]/.test(exchange.path)) throw new ProtocolError('the request path holds white space or control characters');
  const viaProxy = proxy !== undefined && origin.protocol === 'http:';
  const target = viaProxy ? `${origin.protocol}//${origin.host}${exchange.path || '/'}` : exchange.path || '/';
  let head = `${exchange.method} ${target} HTTP/1.1\r\nhost: ${origin.host}\r\n`;
  if (viaProxy && proxy.authorization) head += `proxy-authorization: ${proxy.authorization}\r\n`;
  for (const [name, value] of Object.entries(exchange.headers)) {
    if (!TOKEN.test(name) || /[\r\n\x00]/.test(value)) throw new ProtocolError(`header '${name.slice(0, 40)}' holds characters a request cannot carry`);
    head += `${name}: ${value}\r\n`;
  }
  return `${head}\r\n`;
}

/** Parses a status line and header lines (without the blank line that ends them). */
export function parseResponseHead(text: string): { status: number; reason: string; version: string; headers: ResponseHeaders } {
  const lines = text.split('\r\n');
  const m = /^HTTP\/1\.([01]) (\d{3})(?: ([^\r\n]*))?$/.exec(lines[0]);
  if (!m) throw new ProtocolError(`not an HTTP/1.x status line: '${lines[0].slice(0, 60)}'`);
  const headers: ResponseHeaders = Object.create(null);
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i];
    const colon = line.indexOf(':');
    if (colon <= 0 || !TOKEN.test(line.slice(0, colon))) throw new ProtocolError(`malformed header line '${line.slice(0, 60)}'`);
    const name = line.slice(0, colon).toLowerCase();
    const value = line.slice(colon + 1).trim();
    const seen = headers[name];
    if (seen === undefined) headers[name] = value;
    else if (Array.isArray(seen)) seen.push(value);
    else headers[name] = [seen, value];
  }
  return { status: Number(m[2]), reason: m[3] ?? '', version: `1.${m[1]}`, headers };
}
