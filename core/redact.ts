/**
 * Secrets out of printed text: a URL's userinfo (`https://user:pass@host`) and the
 * values of secret-looking query parameters (presigned URLs' signatures, tokens). Used
 * wherever a spec or URL is shown (errors, `tapkit info`, logs); the unredacted text is
 * still what gets opened.
 */

/** Query parameters whose values are secrets (presigned URLs, tokens). */
const SECRET_QUERY = /sig|signature|token|credential|secret|password|passwd|key|auth/i;

/** The URL with userinfo removed and secret query values replaced, safe to print. */
export function redactUrl(url: URL | string): string {
  let u: URL;
  try {
    u = new URL(String(url));
  } catch {
    return '<malformed URL>';
  }
  u.username = '';
  u.password = '';
  for (const key of [...u.searchParams.keys()]) {
    if (SECRET_QUERY.test(key)) u.searchParams.set(key, 'REDACTED');
  }
  return u.href;
}

/** A spec with the URL it ends in (if any) redacted: `cache:https://u:p@h/x` → `cache:https://h/x`. */
export function redactSpec(spec: string): string {
  const m = /[A-Za-z][A-Za-z0-9+.-]*:\/\/\S*$/.exec(spec);
  if (!m) return spec;
  return spec.slice(0, m.index) + redactUrl(m[0]);
}
