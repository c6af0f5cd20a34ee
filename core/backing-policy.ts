/**
 * Where a backing chain may reach. A backing file or parent named inside an image is
 * untrusted input: an image must not be able to make tapkit open /etc/shadow, a block
 * device, or a file on another server. The rules (SECURITY.md has the threat model):
 *
 *  - An image on a local file system may open backing files inside the directory tree
 *    of the image the user named (symlinks resolved), or inside a tree the user allowed
 *    (`--allow-backing DIR`); never a device, never anything under /dev, /proc or /sys,
 *    never a URL unless the user allowed that URL prefix.
 *  - An image reached by URL may open backing files on the same origin (scheme, host,
 *    port), or under a URL prefix the user allowed; never a local file unless the user
 *    allowed that directory.
 *  - `--no-backing` forbids backing files; `--backing SPEC` (per level) names the chain
 *    explicitly, and an image that names a deeper level than given is refused.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockError } from './errors';
import { isUrl, resolveBacking } from './resolve';

export interface BackingPolicyOptions {
  /** Extra trees (absolute directories) and URL prefixes a chain may reach. */
  allow?: string[];
  /** Refuse every backing file. */
  noBacking?: boolean;
  /** The chain given by the user, one spec per level, used instead of the names in the images. */
  explicit?: string[];
}

export interface BackingDecision {
  /** What to open (a path, a URL, or the user's explicit spec). */
  target: string;
  /** True when the target is the user's own spec: no format is forced on it. */
  explicit: boolean;
}

const FORBIDDEN_TREES = ['/dev', '/proc', '/sys'];

export class BackingPolicy {
  private readonly allowDirs: string[];
  private readonly allowUrls: string[];

  constructor(private readonly options: BackingPolicyOptions = {}) {
    const allow = options.allow ?? [];
    this.allowUrls = allow.filter((a) => isUrl(a));
    this.allowDirs = allow.filter((a) => !isUrl(a)).map((d) => realOrResolved(d));
  }

  /**
   * Decides what a backing reference opens, or throws EACCES naming the rule it broke.
   * `level` is 0 for the top image's backing file, 1 for its backing file's, and so on.
   */
  decide(name: string, childLocation: string | undefined, rootLocation: string | undefined, level: number, childSpec: string, role: 'backing' | 'data-file' = 'backing'): BackingDecision {
    const refuse = (rule: string) =>
      new BlockError('EACCES', `backing policy (${rule}): '${childSpec}' names ${role === 'data-file' ? 'data file' : 'backing file'} '${printable(name)}', which is refused`);
    // A data file is part of the image, not a layer: only the confinement rules apply to it.
    const layer = role === 'backing';
    if (layer && this.options.noBacking) throw refuse('--no-backing');
    if (layer && this.options.explicit && this.options.explicit.length > 0) {
      const spec = this.options.explicit[level];
      if (spec === undefined) throw refuse(`--backing names ${this.options.explicit.length} level(s), the image names more`);
      return { target: spec, explicit: true };
    }
    // A NUL cannot be in a path: such a name is damage, and no file system call may see it.
    if (name.includes('\0')) throw refuse('a backing name may not hold a NUL byte');
    const resolved = resolveBacking(name, childLocation, childSpec);
    if (isUrl(resolved)) {
      if (this.allowUrls.some((prefix) => resolved.startsWith(prefix))) return { target: resolved, explicit: false };
      if (rootLocation && isUrl(rootLocation) && sameOrigin(resolved, rootLocation)) return { target: resolved, explicit: false };
      throw refuse(rootLocation && isUrl(rootLocation) ? 'URL images may only reach their own origin; allow others with --allow-backing URL' : 'a local image may not reach a URL; allow it with --allow-backing URL');
    }
    // A local path.
    const lexical = path.resolve(resolved);
    if (FORBIDDEN_TREES.some((tree) => isInside(lexical, tree))) throw refuse('no backing file under /dev, /proc or /sys');
    const real = realOrResolved(lexical);
    if (FORBIDDEN_TREES.some((tree) => isInside(real, tree))) throw refuse('no backing file under /dev, /proc or /sys (after resolving links)');
    const trees = [...this.allowDirs];
    if (rootLocation && !isUrl(rootLocation)) trees.push(path.dirname(realOrResolved(rootLocation)));
    // Judged on the real path, so a symlink inside the tree cannot lead out of it.
    if (!trees.some((tree) => isInside(real, tree))) {
      throw refuse(
        rootLocation && isUrl(rootLocation)
          ? 'a URL image may not reach a local file; allow a directory with --allow-backing DIR'
          : `outside the image's directory tree${trees.length ? ` (${trees.join(', ')})` : ''}; allow it with --allow-backing DIR`,
      );
    }
    try {
      const stat = fs.statSync(real);
      if (!stat.isFile()) throw refuse('a backing file must be a regular file, not a device or directory');
    } catch (e) {
      if (e instanceof BlockError) throw e;
      // A missing file is left for the open to report.
    }
    return { target: lexical, explicit: false };
  }
}

/** A name as it can be shown: control characters escaped. */
function printable(name: string): string {
  return name.replace(/[\x00-\x1f\x7f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

/** What identifies an image in a chain for loop detection: a URL as written, a path by its real path. */
export function chainIdentity(location: string): string {
  return isUrl(location) ? location : realOrResolved(location);
}

function isInside(candidate: string, tree: string): boolean {
  const relative = path.relative(tree, candidate);
  return relative === '' || (!relative.startsWith('..') && !path.isAbsolute(relative));
}

function realOrResolved(p: string): string {
  try {
    return fs.realpathSync(p);
  } catch {
    return path.resolve(p);
  }
}

function sameOrigin(a: string, b: string): boolean {
  try {
    return new URL(a).origin === new URL(b).origin;
  } catch {
    return false;
  }
}
