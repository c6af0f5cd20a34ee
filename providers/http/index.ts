/**
 * http: a read-only disk whose bytes are an object on a web server or object store,
 * read with range requests (`http://…`, `https://…`, `http,timeout=10:https://…`,
 * `qcow2:https://…`). See README.md for options, consistency and fault handling.
 * It has no write, trim or zero: the VBD answers them with EROFS.
 */
import * as fs from 'node:fs';
import { SpecError } from '../../core/errors';
import { isSourceChanged } from '../../core/changed';
import { OpenRequest } from '../../core/open-request';
import type { Capabilities, DiskInfo, Extent, Provider } from '../../core/provider';
import { provider } from '../../core/registry';
import { parseSize } from '../../core/size';
import { HttpClient, type ObjectInfo } from './client';
import { RangeReader } from './reader';
import { NO_PROXY_OPTION, parseProxy } from './proxy';
import { parseHeaderOption, redactUrl } from './url';

const DEFAULTS = {
  timeoutSeconds: 30,
  retries: 5,
  connections: 8,
  readahead: 16 << 20,
  maxRequest: 2 << 20,
};

/**
 * One readahead request: a quarter of the window (so that several are in flight), from
 * 256 KiB to 8 MiB. Large requests are what make a sequential stream cheap: each one costs
 * the server (nginx: open, headers, a sendfile) and us (a request, a response head, promise
 * hops) about the same whatever its size.
 */
function readaheadChunk(readahead: number): number {
  return Math.min(8 << 20, Math.max(256 << 10, Math.floor(readahead / 4)));
}

interface HttpSettings {
  timeoutMs: number;
  retries: number;
  connections: number;
  readahead: number;
  headers: Record<string, string>;
  ca?: string;
  caPath?: string;
  /** The proxy option, percent-decoded (a URL or `none`); unset: from the environment. */
  proxy?: string;
}

/**
 * The http source of the image that named this backing file, if it is on the same
 * origin: a backing file is opened as a bare URL (no options), so it takes that image's
 * settings and credentials, and `qcow2` over `http,header=…:https://h/top.qcow2` can read
 * `base.qcow2`. Only the image's own chain is searched: another disk open on the same
 * origin never lends its credentials.
 */
function sourceOfParent(namedBy: Provider | undefined, origin: string): HttpProvider | undefined {
  for (let p: Provider | undefined = namedBy; p; p = p.lower) {
    const candidate: Provider = p;
    if (candidate instanceof HttpProvider && candidate.origin === origin) return candidate;
  }
  return undefined;
}

function positiveNumber(text: string, what: string, spec: string): number {
  const n = Number(text);
  if (!Number.isFinite(n) || n <= 0) throw new SpecError('EINVAL', `http: option ${what} must be a positive number (got '${text}') in spec '${spec}'`, true);
  return n;
}

@provider({
  name: 'http',
  kind: 'source',
  description: 'a read-only object on a web server or object store, read with range requests (http://…, https://…)',
  schemes: ['http', 'https'],
  options: ['timeout', 'retries', 'connections', 'readahead', 'ca', 'header', 'proxy'],
})
export class HttpProvider implements Provider {
  readonly name = 'http';
  /** The URL as opened, credentials removed: safe to print and to resolve backing names against. */
  readonly location: string;
  private url: URL;
  /** The origin of the URL as opened (before redirects): backing files on it inherit from this source. */
  readonly origin: string;
  /** The URL's userinfo as given, handed to backing files on the same origin. */
  private readonly credentials: { username: string; password: string };
  private readonly settings: HttpSettings;
  private readonly client: HttpClient;
  private object!: ObjectInfo;
  private reader!: RangeReader;
  /** Once the object changed, every read fails: old and new bytes are never mixed. */
  private changed?: unknown;

  constructor(private readonly request: OpenRequest) {
    // The spec may be `http:URL` or a bare URL: never print it, it may hold credentials.
    let url: URL;
    try {
      url = new URL(request.arg);
    } catch {
      throw new SpecError('EINVAL', `http: malformed URL '${redactUrl(request.arg)}'`, true);
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new SpecError('EINVAL', `http: only http:// and https:// URLs (got ${url.protocol}//)`, true);
    url.hash = '';
    this.location = redactUrl(url);
    this.origin = url.origin;
    const parent = sourceOfParent(request.namedBy, url.origin);
    if (parent && !url.username && !url.password) {
      url.username = parent.credentials.username;
      url.password = parent.credentials.password;
    }
    this.credentials = { username: url.username, password: url.password };
    this.settings = this.settingsFor(request.options, parent?.settings);
    this.url = url;
    this.client = new HttpClient({
      timeoutMs: this.settings.timeoutMs,
      retries: this.settings.retries,
      headers: this.settings.headers,
      ca: this.settings.ca,
      connections: this.settings.connections,
      proxy: this.settings.proxy,
    });
  }

  /** Options given in the spec, over those of the image this is the backing file of, over the defaults. */
  private settingsFor(options: Readonly<Record<string, string>>, inherited: HttpSettings | undefined): HttpSettings {
    const spec = this.location;
    const base: HttpSettings = inherited ?? {
      timeoutMs: DEFAULTS.timeoutSeconds * 1000,
      retries: DEFAULTS.retries,
      connections: DEFAULTS.connections,
      readahead: DEFAULTS.readahead,
      headers: {},
    };
    const settings: HttpSettings = {
      ...base,
      timeoutMs: options.timeout ? positiveNumber(options.timeout, 'timeout (seconds)', spec) * 1000 : base.timeoutMs,
      retries: options.retries !== undefined ? Number(options.retries) : base.retries,
      connections: options.connections ? Math.floor(positiveNumber(options.connections, 'connections', spec)) : base.connections,
      readahead: options.readahead !== undefined ? parseSize(options.readahead, 'http readahead') : base.readahead,
    };
    if (!Number.isInteger(settings.retries) || settings.retries < 0) {
      throw new SpecError('EINVAL', `http: option retries must be a whole number (got '${options.retries}') in spec '${spec}'`, true);
    }
    if (options.header !== undefined) {
      try {
        settings.headers = parseHeaderOption(options.header);
      } catch (e) {
        throw new SpecError('EINVAL', `http: ${(e as Error).message} in spec '${spec}'`, true);
      }
    }
    if (options.proxy !== undefined) {
      // Percent-encoded like header (a spec's option values hold no ':' or ',').
      let proxy: string;
      try {
        proxy = decodeURIComponent(options.proxy);
        if (proxy !== NO_PROXY_OPTION) parseProxy(proxy, 'option proxy');
      } catch (e) {
        throw new SpecError('EINVAL', `http: ${e instanceof URIError ? 'malformed percent-encoding in option proxy' : (e as Error).message} in spec '${spec}'`, true);
      }
      settings.proxy = proxy;
    }
    if (options.ca !== undefined) {
      try {
        settings.ca = fs.readFileSync(options.ca, 'utf8');
        settings.caPath = options.ca;
      } catch (e) {
        throw new SpecError('ENOENT', `http: cannot read the CA file '${options.ca}': ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, true);
      }
      if (!settings.ca.includes('-----BEGIN CERTIFICATE-----')) throw new SpecError('EINVAL', `http: the CA file '${options.ca}' holds no PEM certificate`, true);
    }
    return settings;
  }

  async open(): Promise<void> {
    try {
      this.object = await this.client.probe(this.url);
    } catch (e) {
      await this.client.close();
      throw e;
    }
    // Later ranges go straight to where the redirects ended.
    this.url = this.object.url;
    if (!this.object.validator.etag && !this.object.validator.lastModified) {
      this.request.warn(`http: ${this.location} has neither ETag nor Last-Modified: if the object is replaced while open, the change cannot be detected`);
    }
    this.reader = new RangeReader((targets, offset) => this.client.readRange(this.url, targets, offset, this.object.validator), {
      size: this.object.size,
      maxInFlight: this.settings.connections,
      maxRequest: DEFAULTS.maxRequest,
      readahead: this.settings.readahead,
      chunkSize: readaheadChunk(this.settings.readahead),
    });
  }

  info(): DiskInfo {
    return { size: this.object.size, logicalBlockSize: 1, physicalBlockSize: 4096, readOnly: true };
  }

  capabilities(): Capabilities {
    return { write: false, flush: false, fua: false, trim: false, zero: false, extents: true, multiConn: true, concurrent: true };
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    if (this.changed) throw this.changed;
    if (buf.length === 0) return;
    await this.watch(this.reader.read(buf, offset));
  }

  /** Remembers a change of the object seen by a read: every later read fails. */
  private async watch<T>(reading: Promise<T>): Promise<T> {
    try {
      return await reading;
    } catch (e) {
      if (isSourceChanged(e)) {
        this.changed ??= e;
        this.reader.reset();
      }
      throw e;
    }
  }

  /**
   * Lends the readahead window's chunks where a sequential reader's range lies in it (the
   * NBD server sends them as they are); anything else is read with `read`.
   */
  readViews(offset: number, length: number): Promise<Uint8Array[]> | undefined {
    if (this.changed) return undefined;
    const lent = this.reader.lend(offset, length);
    return lent && this.watch(lent);
  }

  /** Readahead chunks whose views are all back are reused. */
  returnViews(views: readonly Uint8Array[]): void {
    this.reader.giveBack(views);
  }

  /** A web object has no allocation map: every byte is data. */
  async extents(offset: number, length: number): Promise<Extent[]> {
    return [{ offset, length, type: 'data' }];
  }

  describe(): Record<string, unknown> {
    const facts: Record<string, unknown> = { url: this.location, size: this.object.size };
    if (redactUrl(this.url) !== this.location) facts.redirectedTo = redactUrl(this.url);
    if (this.object.validator.etag) facts.etag = this.object.validator.etag;
    if (this.object.validator.lastModified) facts.lastModified = this.object.validator.lastModified;
    facts.validator = this.validator();
    if (this.object.server) facts.server = this.object.server;
    const proxy = this.client.proxyOf(this.url);
    if (proxy) facts.proxy = proxy;
    return facts;
  }

  /** What identifies this version of the object (for caches that persist its bytes). */
  validator(): string | undefined {
    const v = this.object.validator;
    if (v.etag) return `etag:${v.etag}`;
    if (v.lastModified) return `last-modified:${v.lastModified}`;
    return undefined;
  }

  async close(): Promise<void> {
    this.reader?.reset();
    await this.client.close();
  }
}
