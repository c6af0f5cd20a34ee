/**
 * NBD URIs (the libnbd / qemu syntax, github.com/NetworkBlockDevice/nbd doc/uri.md) for
 * what a server listens on, and the `HOST:PORT` / socket-path arguments that name it.
 */
import * as os from 'node:os';
import * as path from 'node:path';
import type { ListenTarget } from './server';

/** `nbd+unix:///NAME?socket=PATH` (`nbds+unix` with TLS). */
export function unixUri(name: string, socket: string, tls = false): string {
  return `nbd${tls ? 's' : ''}+unix:///${encodeURIComponent(name)}?socket=${socket}`;
}

/** `nbd://HOST:PORT/NAME` (`nbds` with TLS); a wildcard address shows the host name. */
export function tcpUri(name: string, host: string, port: number, tls = false): string {
  const shown = host === '0.0.0.0' || host === '::' ? os.hostname() : host.includes(':') ? `[${host}]` : host;
  return `nbd${tls ? 's' : ''}://${shown}:${port}/${encodeURIComponent(name)}`;
}

/** `HOST:PORT`, `[v6]:PORT`, or `:PORT` (all addresses); undefined when it is none of these. */
export function parseHostPort(text: string): { host: string; port: number } | undefined {
  const m = /^(?:\[([^\]]+)\]|([^:/]*)):(\d+)$/.exec(text);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) return undefined;
  return { host: m[1] ?? (m[2] || '0.0.0.0'), port };
}

/**
 * Where to listen, from `unix:PATH`, `tcp:HOST:PORT`, an absolute or ./relative socket
 * path, or `HOST:PORT`. Relative socket paths are taken from `cwd`.
 */
export function parseListenTarget(text: string, cwd = process.cwd()): ListenTarget {
  if (text.startsWith('unix:')) {
    const socket = text.slice('unix:'.length);
    if (!socket) throw new Error(`'${text}' names no socket path`);
    return { path: path.resolve(cwd, socket) };
  }
  if (text.startsWith('tcp:')) {
    const address = parseHostPort(text.slice('tcp:'.length));
    if (!address) throw new Error(`'${text}' is not tcp:HOST:PORT`);
    return address;
  }
  if (text.startsWith('/') || text.startsWith('./') || text.startsWith('../')) return { path: path.resolve(cwd, text) };
  const address = parseHostPort(text);
  if (address) return address;
  throw new Error(`'${text}' is neither a socket path (absolute, or unix:PATH) nor HOST:PORT (or tcp:HOST:PORT)`);
}
