/**
 * URLs as the http source handles them: credentials split off for requests, and a
 * redacted form for everything printed (errors, logs, `location`, `describe()`).
 */

export { redactUrl } from '../../core/redact';

/** `scheme://host:port`, the key of a connection pool. */
export function originOf(u: URL): string {
  return u.origin;
}

/** The path and query a request line carries. */
export function requestPath(u: URL): string {
  return `${u.pathname}${u.search}`;
}

/** A Basic Authorization header value for a URL's userinfo, if it has any. */
export function basicAuthFor(u: URL): string | undefined {
  if (!u.username && !u.password) return undefined;
  const user = decodeURIComponent(u.username);
  const pass = decodeURIComponent(u.password);
  return `Basic ${Buffer.from(`${user}:${pass}`).toString('base64')}`;
}

/**
 * Parses the `header` option: one or more `Name: value` lines, percent-decoded (the
 * spec grammar forbids ':' and ',' in option values, so `Authorization%3A Bearer x`).
 * Several headers are separated by a newline (`%0A`).
 */
export function parseHeaderOption(text: string): Record<string, string> {
  let decoded: string;
  try {
    decoded = decodeURIComponent(text);
  } catch {
    throw new Error(`malformed percent-encoding in header option`);
  }
  const headers: Record<string, string> = {};
  for (const line of decoded.split(/\r?\n/)) {
    if (line.trim() === '') continue;
    const colon = line.indexOf(':');
    const name = colon > 0 ? line.slice(0, colon).trim() : '';
    if (!/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(name)) throw new Error(`header option needs 'Name: value' (write ':' as %3A)`);
    headers[name.toLowerCase()] = line.slice(colon + 1).trim();
  }
  return headers;
}
