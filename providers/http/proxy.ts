/**
 * HTTP proxies for the http source, chosen as curl chooses them (so a host that works
 * with `curl` or `qemu-img` through a proxy works with tapkit): the `proxy` option, else
 * `http_proxy` for http URLs (lower case only: a CGI program's HTTP_PROXY comes from a
 * request header), `https_proxy`/`HTTPS_PROXY` for https, `all_proxy`/`ALL_PROXY` for
 * both, unless the host matches `no_proxy`/`NO_PROXY`.
 *
 * Only http:// proxies are spoken to: http URLs go to the proxy in absolute form, https
 * URLs through a CONNECT tunnel (TLS runs end to end with the origin, inside it).
 * Credentials in the proxy URL become a Proxy-Authorization header and are never printed.
 */
import * as net from 'node:net';
import { basicAuthFor, redactUrl } from './url';

export interface Proxy {
  /** The proxy's URL (http:, credentials included). */
  url: URL;
  /** The Proxy-Authorization header value, from the URL's userinfo. */
  authorization?: string;
}

/** The `proxy` option's value that means "no proxy, whatever the environment says". */
export const NO_PROXY_OPTION = 'none';

/**
 * Parses a proxy as written in the option or the environment: a URL, or `host:port`
 * (taken as http://, as curl does). Anything but an http proxy is refused by name.
 */
export function parseProxy(text: string, from: string): Proxy {
  const written = /^[a-z][a-z0-9+.-]*:\/\//i.test(text) ? text : `http://${text}`;
  let url: URL;
  try {
    url = new URL(written);
  } catch {
    throw new Error(`${from} is not a proxy URL`);
  }
  if (url.protocol !== 'http:') {
    throw new Error(`${from}: only http:// proxies are supported (got ${url.protocol}//; an https or SOCKS proxy is not)`);
  }
  if (!url.hostname) throw new Error(`${from} names no proxy host`);
  return { url, authorization: basicAuthFor(url) };
}

/**
 * Whether `target` is excluded by a no_proxy list: `*` excludes everything; otherwise
 * comma- or space-separated host names (matching the host and its subdomains, a leading
 * dot allowed), IP addresses, and either with `:port` to match that port only.
 */
export function bypassesProxy(target: URL, noProxy: string | undefined): boolean {
  if (!noProxy) return false;
  const host = target.hostname.replace(/^\[(.*)\]$/, '$1').toLowerCase().replace(/\.$/, '');
  const port = target.port || (target.protocol === 'https:' ? '443' : '80');
  for (const raw of noProxy.split(/[\s,]+/)) {
    let entry = raw.trim().toLowerCase();
    if (!entry) continue;
    if (entry === '*') return true;
    let entryPort: string | undefined;
    const bracketed = /^\[(.*)\](?::(\d+))?$/.exec(entry);
    if (bracketed) {
      entry = bracketed[1];
      entryPort = bracketed[2];
    } else if (net.isIPv6(entry)) {
      // a bare IPv6 address: its colons are not a port
    } else {
      const colon = entry.lastIndexOf(':');
      if (colon > 0 && /^\d+$/.test(entry.slice(colon + 1))) {
        entryPort = entry.slice(colon + 1);
        entry = entry.slice(0, colon);
      }
    }
    if (entryPort !== undefined && entryPort !== port) continue;
    entry = entry.replace(/^\./, '').replace(/\.$/, '');
    if (host === entry || (!net.isIP(host) && host.endsWith(`.${entry}`))) return true;
  }
  return false;
}

/**
 * The proxy for `target`: `option` when given (`none` for a direct connection), else the
 * environment's, else none.
 */
export function proxyFor(target: URL, option: string | undefined, env: NodeJS.ProcessEnv = process.env): Proxy | undefined {
  if (option !== undefined) return option === NO_PROXY_OPTION ? undefined : parseProxy(option, 'the proxy option');
  const https = target.protocol === 'https:';
  const candidates: Array<[string, string | undefined]> = https
    ? [['https_proxy', env.https_proxy], ['HTTPS_PROXY', env.HTTPS_PROXY]]
    : [['http_proxy', env.http_proxy]];
  candidates.push(['all_proxy', env.all_proxy], ['ALL_PROXY', env.ALL_PROXY]);
  const chosen = candidates.find(([, value]) => value !== undefined && value.trim() !== '');
  if (!chosen) return undefined;
  if (bypassesProxy(target, env.no_proxy ?? env.NO_PROXY)) return undefined;
  return parseProxy(chosen[1]!.trim(), `the ${chosen[0]} environment variable`);
}

/** The proxy as it may be printed. */
export function describeProxy(proxy: Proxy): string {
  return redactUrl(proxy.url).replace(/\/$/, '');
}

/** `host:port` of the origin, as a CONNECT request and Host header name it. */
export function authorityOf(origin: URL): string {
  const port = origin.port || (origin.protocol === 'https:' ? '443' : '80');
  return `${origin.hostname}:${port}`;
}

/** A CONNECT request for a tunnel to `origin`. */
export function connectRequest(origin: URL, proxy: Proxy): string {
  const authority = authorityOf(origin);
  let head = `CONNECT ${authority} HTTP/1.1\r\nhost: ${authority}\r\n`;
  if (proxy.authorization) head += `proxy-authorization: ${proxy.authorization}\r\n`;
  return `${head}\r\n`;
}

/** The proxy answered a CONNECT with something other than 2xx (407: it wants credentials). */
export class ProxyRefusedError extends Error {
  readonly code = 'EPROXY';
  constructor(
    readonly status: number,
    readonly reason: string,
    proxy: Proxy,
    origin: URL,
  ) {
    super(`proxy ${describeProxy(proxy)} answered ${status}${reason ? ` ${reason}` : ''} to CONNECT ${authorityOf(origin)}`);
  }
}
