/** Resolving a backing name against the location of the image that names it. */
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { BlockError } from './errors';

const URL_RE = /^[A-Za-z][A-Za-z0-9+.-]*:\/\//;

/** True for `scheme://…` (a URL location or spec), false for a path. */
export function isUrl(text: string): boolean {
  return URL_RE.test(text);
}

/**
 * A URL name stays as it is; a name under a URL image resolves as a relative URL (so an
 * image on a web server finds its backing file on the same server); a path resolves
 * against the directory of a local image.
 */
export function resolveBacking(name: string, location: string | undefined, childSpec: string): string {
  // qemu accepts `file:` names (file:///abs, file:rel): they name local files, and are judged as such.
  if (/^file:/i.test(name)) return resolveFileName(name, location, childSpec);
  if (URL_RE.test(name)) return name;
  if (location && URL_RE.test(location)) return new URL(name, location).href;
  if (path.isAbsolute(name)) return path.normalize(name);
  if (!location) throw new BlockError('EINVAL', `cannot resolve the relative backing name '${name}': '${childSpec}' has no location`);
  return path.resolve(path.dirname(location), name);
}

function resolveFileName(name: string, location: string | undefined, childSpec: string): string {
  let local: string;
  try {
    local = name.startsWith('file://') ? fileURLToPath(name) : name.slice('file:'.length);
  } catch (e) {
    throw new BlockError('EINVAL', `malformed file: backing name '${name}' in '${childSpec}': ${(e as Error).message}`);
  }
  if (path.isAbsolute(local)) return path.normalize(local);
  if (!location || URL_RE.test(location)) {
    throw new BlockError('EACCES', `backing policy (a relative file: name needs a local image): '${childSpec}' names backing file '${name}', which is refused`);
  }
  return path.resolve(path.dirname(location), local);
}
