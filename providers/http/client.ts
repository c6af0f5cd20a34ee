/**
 * The HTTP side of the http source: pooled keep-alive connections (one ConnectionPool per
 * origin), redirects, retries with backoff, per-request timeouts, TLS trust, and the
 * two requests the source needs: "what is this object" (HEAD, or a one-byte ranged GET)
 * and "these bytes of it" (a conditional ranged GET read into the caller's buffer).
 *
 * Every message names the URL in its redacted form: credentials never leave this module
 * except inside an Authorization header.
 */
import * as fs from 'node:fs';
import * as tls from 'node:tls';
import { ConnectionPool, ProtocolError, type BodyPlan, type ResponseHeaders } from './connection';
import { BlockError } from '../../core/errors';
import { SourceChangedError } from '../../core/changed';
import { Scatter } from './scatter';
import { basicAuthFor, redactUrl, requestPath } from './url';
import { describeProxy, proxyFor, ProxyRefusedError, type Proxy } from './proxy';

export interface ClientOptions {
  /** Per attempt: connect, headers and the whole body must arrive within this. */
  timeoutMs: number;
  /** Extra attempts after the first one fails in a retryable way. */
  retries: number;
  /** Sent with every request (lower-case names). */
  headers: Record<string, string>;
  /** PEM text of extra trusted CAs (the `ca` option). */
  ca?: string;
  /** Connections per origin, and so the bound on requests in flight. */
  connections: number;
  /** The `proxy` option (a URL, or `none`); unset: the environment decides (proxy.ts). */
  proxy?: string;
}

/** What identifies one version of the object: sent back with every range request. */
export interface Validator {
  etag?: string;
  lastModified?: string;
}

export interface ObjectInfo {
  /** The URL after redirects: later range requests go straight there. */
  url: URL;
  size: number;
  validator: Validator;
  server?: string;
}

/** A failure worth another try (connection dropped, 5xx, 429, timeout). */
class Retryable extends Error {
  constructor(
    message: string,
    readonly retryAfterMs?: number,
    readonly timedOut = false,
  ) {
    super(message);
  }
}

interface Response {
  statusCode: number;
  headers: ResponseHeaders;
  url: URL;
  /** Body bytes written into the plan's buffers. */
  received: number;
}

const MAX_REDIRECTS = 10;
const BACKOFF_BASE_MS = 200;
const BACKOFF_MAX_MS = 8000;
/** A Retry-After longer than this is shortened: a guest's I/O should not wait an hour. */
const RETRY_AFTER_MAX_MS = 30_000;

/** Error codes of connections that failed in a way another try may fix. */
const RETRYABLE_CODES = new Set([
  'ECONNRESET', 'ECONNREFUSED', 'ECONNABORTED', 'EPIPE', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'ENETDOWN', 'EAI_AGAIN',
  'UND_ERR_SOCKET', 'UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT', 'UND_ERR_CLOSED', 'UND_ERR_ABORTED',
  'UND_ERR_RES_CONTENT_LENGTH_MISMATCH', 'UND_ERR_REQ_CONTENT_LENGTH_MISMATCH', 'ERR_STREAM_PREMATURE_CLOSE',
]);

/** TLS verification failures: refused at once, with a hint about `ca=`. */
const TLS_CODES = /CERT|SELF_SIGNED|UNABLE_TO_VERIFY|UNABLE_TO_GET_ISSUER|ERR_TLS/;

let systemCas: string[] | undefined;
/** Node's bundled roots plus the distribution's CA bundle (what curl and openssl trust). */
function trustedCas(): string[] {
  if (!systemCas) {
    systemCas = [...tls.rootCertificates];
    for (const bundle of ['/etc/ssl/certs/ca-certificates.crt', '/etc/pki/tls/certs/ca-bundle.crt', '/etc/ssl/cert.pem']) {
      try {
        systemCas.push(fs.readFileSync(bundle, 'utf8'));
        break;
      } catch {
        // not this distribution's path
      }
    }
  }
  return systemCas;
}

function header(headers: ResponseHeaders, name: string): string | undefined {
  const value = headers[name];
  return Array.isArray(value) ? value[0] : value;
}

/** Retry-After as milliseconds: delta-seconds or an HTTP date. */
function retryAfterMs(headers: ResponseHeaders): number | undefined {
  const value = header(headers, 'retry-after');
  if (!value) return undefined;
  const ms = /^\d+$/.test(value.trim()) ? Number(value) * 1000 : Date.parse(value) - Date.now();
  return Number.isFinite(ms) ? Math.min(Math.max(ms, 0), RETRY_AFTER_MAX_MS) : undefined;
}

/**
 * Parses Content-Range: `bytes START-END/TOTAL` (TOTAL may be a star), or a star range on
 * a 416. Numbers past 2^53 (a hostile or broken server) make it unparsable.
 */
export function parseContentRange(value: string | undefined): { start?: number; end?: number; total?: number } | undefined {
  if (!value) return undefined;
  const m = /^\s*bytes\s+(?:(\d+)-(\d+)|\*)\/(\d+|\*)\s*$/i.exec(value);
  if (!m) return undefined;
  const range = {
    start: m[1] === undefined ? undefined : Number(m[1]),
    end: m[2] === undefined ? undefined : Number(m[2]),
    total: m[3] === '*' ? undefined : Number(m[3]),
  };
  for (const v of [range.start, range.end, range.total]) if (v !== undefined && !Number.isSafeInteger(v)) return undefined;
  return range;
}

function validatorOf(headers: ResponseHeaders): Validator {
  return { etag: header(headers, 'etag'), lastModified: header(headers, 'last-modified') };
}

function describeValidator(v: Validator): string {
  return v.etag ? `ETag ${v.etag}` : v.lastModified ? `Last-Modified ${v.lastModified}` : 'no validator';
}

export class HttpClient {
  private readonly pools = new Map<string, ConnectionPool>();
  /** The proxy each origin is reached through (none: direct). */
  private readonly proxies = new Map<string, Proxy | undefined>();
  private readonly closing = new AbortController();
  /** Stops every exchange in flight (on close). */
  private readonly active = new Set<() => void>();
  private readonly ca: string[] | undefined;
  /** Redacted forms of the URLs requested (the same URL object for every range): printing is not paid per request. */
  private readonly redacted = new WeakMap<URL, string>();

  constructor(private readonly options: ClientOptions) {
    this.ca = options.ca ? [...trustedCas(), options.ca] : undefined;
  }

  /** The proxy (printable) requests for `url` went through, if any. */
  proxyOf(url: URL): string | undefined {
    const proxy = this.proxies.get(url.origin);
    return proxy && describeProxy(proxy);
  }

  /** The URL as it may be printed. */
  private where(url: URL): string {
    let shown = this.redacted.get(url);
    if (shown === undefined) this.redacted.set(url, (shown = redactUrl(url)));
    return shown;
  }

  /** Learns size, validator and final URL: HEAD, or a one-byte ranged GET where HEAD is refused. */
  async probe(url: URL): Promise<ObjectInfo> {
    const head = await this.withRetries(`HEAD ${this.where(url)}`, () => this.headOnce(url));
    if (head) return head;
    return this.withRetries(`GET ${this.where(url)}`, () => this.rangeProbeOnce(url));
  }

  /**
   * Reads `target.length` bytes at `offset` of the object version `validator` names.
   * A different version is a SourceChangedError; anything but 206 with the asked range
   * is refused (the body is aborted, never read whole).
   */
  async readRange(url: URL, targets: readonly Uint8Array[], offset: number, validator: Validator): Promise<void> {
    const length = targets.reduce((sum, t) => sum + t.length, 0);
    const end = offset + length - 1;
    const asked = (headers: ResponseHeaders) => {
      const range = parseContentRange(header(headers, 'content-range'));
      return range !== undefined && range.start === offset && range.end === end;
    };
    await this.withRetries(`GET ${this.where(url)} bytes ${offset}-${end}`, async () => {
      const res = await this.request(url, 'GET', { range: `bytes=${offset}-${end}`, ...this.conditionalHeaders(validator) }, (status, headers) => {
        // A fresh Scatter per attempt: a retry fills the buffers from their start again.
        if (status === 206) return asked(headers) && !this.versionDiffers(headers, validator) ? new Scatter(targets) : 'abort';
        // A 200 is the whole object coming: stop it.
        return status === 200 ? 'abort' : 'drop';
      });
      const where = this.where(res.url);
      if (res.statusCode === 206 || res.statusCode === 200) this.checkSameVersion(res, validator);
      if (res.statusCode === 206) {
        if (!asked(res.headers)) {
          throw new BlockError('EIO', `${where} answered range ${header(res.headers, 'content-range') ?? '(none)'} to a request for bytes ${offset}-${end}`);
        }
        if (res.received !== length) throw new Retryable(`body ended after ${res.received} of ${length} bytes`);
        return;
      }
      if (res.statusCode === 200) {
        throw new BlockError('EIO', `${where} ignored the Range header (answered 200 with the whole object); only servers with range requests are supported`);
      }
      this.failFor(res, validator, true);
    });
  }

  async close(): Promise<void> {
    this.closing.abort();
    for (const stop of [...this.active]) stop();
    const pools = [...this.pools.values()];
    this.pools.clear();
    for (const pool of pools) pool.destroy();
  }

  private async headOnce(url: URL): Promise<ObjectInfo | undefined> {
    const res = await this.request(url, 'HEAD', {}, () => 'drop');
    const where = this.where(res.url);
    if (res.statusCode >= 200 && res.statusCode < 300) {
      if (header(res.headers, 'accept-ranges')?.toLowerCase() === 'none') {
        throw new BlockError('EOPNOTSUPP', `${where} does not serve range requests (Accept-Ranges: none); it cannot be read as a disk without downloading it whole`);
      }
      const length = header(res.headers, 'content-length');
      const encoding = header(res.headers, 'content-encoding');
      // Without a plain length, or when ranges are not announced, ask with a ranged GET.
      if (length === undefined || !/^\d+$/.test(length) || !Number.isSafeInteger(Number(length)) || (encoding && encoding !== 'identity')) return undefined;
      if (header(res.headers, 'accept-ranges')?.toLowerCase() !== 'bytes') return undefined;
      return { url: res.url, size: Number(length), validator: validatorOf(res.headers), server: header(res.headers, 'server') };
    }
    if (res.statusCode === 404 || res.statusCode === 410) throw new BlockError('ENOENT', `${where} not found (HTTP ${res.statusCode})`);
    if (res.statusCode >= 500 || res.statusCode === 429 || res.statusCode === 408) {
      throw new Retryable(`HTTP ${res.statusCode}`, retryAfterMs(res.headers));
    }
    // HEAD refused (405, 501, or a presigned URL signed for GET only): try a ranged GET.
    return undefined;
  }

  private async rangeProbeOnce(url: URL): Promise<ObjectInfo> {
    const res = await this.request(url, 'GET', { range: 'bytes=0-0' }, (status) => (status === 200 ? 'abort' : 'drop'));
    const where = this.where(res.url);
    const info = (size: number): ObjectInfo => ({ url: res.url, size, validator: validatorOf(res.headers), server: header(res.headers, 'server') });
    if (res.statusCode === 206) {
      const range = parseContentRange(header(res.headers, 'content-range'));
      if (range?.total === undefined) throw new BlockError('EIO', `${where} answered a range request without the object's size (Content-Range: ${header(res.headers, 'content-range') ?? 'none'})`);
      return info(range.total);
    }
    if (res.statusCode === 416) {
      // Only an empty object has no byte 0.
      const range = parseContentRange(header(res.headers, 'content-range'));
      if (range?.total === 0) return info(0);
      throw new BlockError('EIO', `${where} refused the range bytes=0-0 (HTTP 416)`);
    }
    if (res.statusCode === 200) {
      throw new BlockError('EOPNOTSUPP', `${where} ignores range requests (answered 200 with the whole object to bytes=0-0); it cannot be read as a disk without downloading it whole`);
    }
    return this.failFor(res, {}, false);
  }

  /** Turns a non-success status into the right error. Never returns. */
  private failFor(res: Response, validator: Validator, opened: boolean): never {
    const where = this.where(res.url);
    const status = res.statusCode;
    if (status >= 500 || status === 429 || status === 408) throw new Retryable(`HTTP ${status}`, retryAfterMs(res.headers));
    if (opened && (status === 412 || status === 416 || status === 404 || status === 410)) {
      const now = validatorOf(res.headers);
      throw new SourceChangedError(`${where} changed since it was opened (HTTP ${status}; opened at ${describeValidator(validator)}${now.etag || now.lastModified ? `, now ${describeValidator(now)}` : ''}); reopen it to read the new version`);
    }
    if (status === 404 || status === 410) throw new BlockError('ENOENT', `${where} not found (HTTP ${status})`);
    if (status === 401 || status === 403) throw new BlockError('EACCES', `${where} refused access (HTTP ${status})`);
    throw new BlockError('EIO', `${where} answered HTTP ${status}`);
  }

  /** If-Match with a strong ETag, else If-Unmodified-Since with Last-Modified. */
  private conditionalHeaders(v: Validator): Record<string, string> {
    if (v.etag && !v.etag.startsWith('W/')) return { 'if-match': v.etag };
    if (v.lastModified) return { 'if-unmodified-since': v.lastModified };
    return {};
  }

  private versionDiffers(headers: ResponseHeaders, opened: Validator): boolean {
    const now = validatorOf(headers);
    return !!((opened.etag && now.etag && opened.etag !== now.etag) || (!opened.etag && opened.lastModified && now.lastModified && opened.lastModified !== now.lastModified));
  }

  /** Also checks what the response says, for servers that ignore conditional headers. */
  private checkSameVersion(res: Response, opened: Validator): void {
    if (this.versionDiffers(res.headers, opened)) {
      const now = validatorOf(res.headers);
      throw new SourceChangedError(`${this.where(res.url)} changed since it was opened (opened at ${describeValidator(opened)}, now ${describeValidator(now)}); reopen it to read the new version`);
    }
  }

  /** One request, redirects followed; the response's `url` is the final one. */
  private async request(start: URL, method: 'GET' | 'HEAD', extra: Record<string, string>, plan: (status: number, headers: ResponseHeaders) => BodyPlan): Promise<Response> {
    let url = start;
    let headers = this.headersFor(url, extra);
    const isRedirect = (status: number, h: ResponseHeaders) => [301, 302, 303, 307, 308].includes(status) && !!header(h, 'location');
    for (let hop = 0; ; hop++) {
      const res = await this.send(url, method, headers, (status, h) => (isRedirect(status, h) ? 'drop' : plan(status, h)));
      if (!isRedirect(res.statusCode, res.headers)) return res;
      if (hop >= MAX_REDIRECTS) throw new BlockError('ELOOP', `${this.where(start)}: more than ${MAX_REDIRECTS} redirects`);
      const next = new URL(header(res.headers, 'location')!, url);
      if (next.protocol !== 'http:' && next.protocol !== 'https:') throw new BlockError('EINVAL', `${this.where(url)} redirects to a ${next.protocol} URL`);
      if (next.origin !== url.origin) {
        // Credentials meant for one host are not handed to the next (as curl does).
        next.username = '';
        next.password = '';
        headers = this.headersFor(next, extra, true);
      }
      url = next;
    }
  }

  private headersFor(url: URL, extra: Record<string, string>, crossOrigin = false): Record<string, string> {
    const headers: Record<string, string> = { ...this.options.headers, ...extra };
    if (crossOrigin) {
      delete headers.authorization;
      delete headers.cookie;
    }
    const basic = basicAuthFor(url);
    if (basic && !headers.authorization) headers.authorization = basic;
    return headers;
  }

  /**
   * One exchange, bounded by the timeout from connect to the body's last byte. The body
   * goes straight into the plan's buffers as it arrives (see connection.ts).
   */
  private send(url: URL, method: 'GET' | 'HEAD', headers: Record<string, string>, plan: (status: number, headers: ResponseHeaders) => BodyPlan): Promise<Response> {
    if (this.closing.signal.aborted) return Promise.reject(new BlockError('ESHUTDOWN', `${this.where(url)}: the disk is closing`));
    return new Promise<Response>((resolve, reject) => {
      let response: Response | undefined;
      let sink: Scatter | undefined;
      let timedOut = false;
      let timer: NodeJS.Timeout | undefined;
      let cancel: (reason: Error) => void = () => {};
      const onClose = () => cancel(new BlockError('ESHUTDOWN', `${this.where(url)}: the disk is closing`));
      const finish = (error?: unknown) => {
        clearTimeout(timer);
        this.active.delete(onClose);
        if (error !== undefined) return reject(this.classify(error, url, timedOut));
        if (sink) response!.received = sink.length - sink.remaining;
        resolve(response!);
      };
      cancel = this.pool(url).dispatch({
        method,
        path: requestPath(url),
        headers,
        onHead: (statusCode, responseHeaders) => {
          response = { statusCode, headers: responseHeaders, url, received: 0 };
          const wanted = plan(statusCode, responseHeaders);
          if (wanted instanceof Scatter) sink = wanted;
          return wanted;
        },
        onEnd: () => finish(),
        onError: (error) => finish(error),
      });
      this.active.add(onClose);
      timer = setTimeout(() => {
        timedOut = true;
        cancel(new Retryable(`no complete answer within ${this.options.timeoutMs / 1000} s`, undefined, true));
      }, this.options.timeoutMs);
    });
  }

  /** A thrown connection error as Retryable, or as a final BlockError. */
  private classify(e: unknown, url: URL, timedOut: boolean): Error {
    if (e instanceof BlockError || e instanceof Retryable) return e;
    if (e instanceof ProtocolError) return new BlockError('EIO', `${this.where(url)}: ${e.message}`);
    if (e instanceof ProxyRefusedError) {
      // A proxy's 5xx is its trouble reaching the origin (or its own): worth another try.
      if (e.status >= 500) return new Retryable(e.message);
      return new BlockError(e.status === 407 ? 'EACCES' : 'EIO', `${this.where(url)}: ${e.message}${e.status === 407 ? ' (give the proxy credentials in its URL: http://user:password@host:port)' : ''}`);
    }
    if (this.closing.signal.aborted) return new BlockError('ESHUTDOWN', `${this.where(url)}: the disk is closing`);
    const err = e as NodeJS.ErrnoException & { cause?: NodeJS.ErrnoException };
    const code = err?.code ?? err?.cause?.code ?? '';
    const name = err?.name ?? '';
    if (timedOut || name === 'TimeoutError' || code.includes('TIMEOUT')) return new Retryable(`no complete answer within ${this.options.timeoutMs / 1000} s`, undefined, true);
    if (code === 'ERR_TLS_CERT_ALTNAME_INVALID') {
      return new BlockError('EIO', `${this.where(url)}: TLS certificate refused: it is not for host ${url.hostname} (${code})`);
    }
    if (code === 'CERT_HAS_EXPIRED' || code === 'CERT_NOT_YET_VALID') {
      return new BlockError('EIO', `${this.where(url)}: TLS certificate refused: outside its validity dates (${code})`);
    }
    if (TLS_CODES.test(code)) {
      return new BlockError('EIO', `${this.where(url)}: TLS certificate refused (${code}); pass --ca FILE (or ca=FILE in the spec) to trust the server's CA`);
    }
    const proxy = this.proxies.get(url.origin);
    if (code === 'ENOTFOUND') return new BlockError('ENOENT', `${this.where(url)}: host ${proxy ? `${proxy.url.hostname} (the proxy)` : url.hostname} not found`);
    if (RETRYABLE_CODES.has(code) || name === 'AbortError') return new Retryable(`connection failed (${code || name})${proxy ? ` through proxy ${describeProxy(proxy)}` : ''}`);
    return new BlockError('EIO', `${this.where(url)}: ${code || name || 'request failed'}`);
  }

  /** Runs one attempt after another until one succeeds, a final error, or the last try. */
  private async withRetries<T>(what: string, attempt: () => Promise<T>): Promise<T> {
    for (let tries = 1; ; tries++) {
      try {
        return await attempt();
      } catch (e) {
        if (!(e instanceof Retryable)) throw e;
        if (tries > this.options.retries) {
          throw new BlockError(e.timedOut ? 'ETIMEDOUT' : 'EIO', `${what}: ${e.message}; gave up after ${tries} ${tries === 1 ? 'try' : 'tries'}`);
        }
        const backoff = Math.min(BACKOFF_BASE_MS * 2 ** (tries - 1), BACKOFF_MAX_MS) * (0.5 + Math.random() / 2);
        await this.sleep(Math.max(backoff, e.retryAfterMs ?? 0), what);
      }
    }
  }

  private sleep(ms: number, what: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const signal = this.closing.signal;
      if (signal.aborted) return reject(new BlockError('ESHUTDOWN', `${what}: the disk is closing`));
      const onAbort = () => {
        clearTimeout(timer);
        reject(new BlockError('ESHUTDOWN', `${what}: the disk is closing`));
      };
      const timer = setTimeout(() => {
        signal.removeEventListener('abort', onAbort);
        resolve();
      }, ms);
      signal.addEventListener('abort', onAbort, { once: true });
    });
  }

  private pool(url: URL): ConnectionPool {
    let pool = this.pools.get(url.origin);
    if (!pool) {
      const origin = new URL(url.origin);
      let proxy: Proxy | undefined;
      try {
        proxy = proxyFor(origin, this.options.proxy);
      } catch (e) {
        throw new BlockError('EINVAL', `${this.where(url)}: ${(e as Error).message}`);
      }
      this.proxies.set(url.origin, proxy);
      pool = new ConnectionPool(origin, { connections: this.options.connections, ca: this.ca, proxy });
      this.pools.set(url.origin, pool);
    }
    return pool;
  }
}
