/** Resolving a backing name against the location of the image that names it. */
import * as path from 'node:path';
import { BlockError } from './errors';

const URL_RE = /^[A-Za-z][A-Za-z0-9+.-]*:\/\//;

/**
 * A URL name stays as it is; a name under a URL image resolves as a relative URL (so an
 * image on a web server finds its backing file on the same server); a path resolves
 * against the directory of a local image.
 */
export function resolveBacking(name: string, location: string | undefined, childSpec: string): string {
  if (URL_RE.test(name)) return name;
  if (location && URL_RE.test(location)) return new URL(name, location).href;
  if (path.isAbsolute(name)) return path.normalize(name);
  if (!location) throw new BlockError('EINVAL', `cannot resolve the relative backing name '${name}': '${childSpec}' has no location`);
  return path.resolve(path.dirname(location), name);
}
