/**
 * What a persisted cache is valid for: the chain under the cache filter (each layer's
 * name and location) and a validator for every source in it (lower and backing files).
 * A source's validator is its `describe().validator` (the http source's ETag or
 * Last-Modified); a local file's is its inode, size and modification time. A chain with
 * a source that has neither (a memory disk) has no identity and is never persisted.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Provider } from '../../core/provider';

function validatorOf(p: Provider): string | undefined {
  const described = p.describe?.().validator;
  if (typeof described === 'string' && described !== '') return described;
  if (p.location && path.isAbsolute(p.location) && !p.lower) {
    try {
      const st = fs.statSync(p.location);
      return `file:${st.dev}:${st.ino}:${st.size}:${st.mtimeMs}`;
    } catch {
      return undefined;
    }
  }
  return undefined;
}

/** A string naming exactly this version of the chain's bytes, or undefined when unknowable. */
export function chainIdentity(top: Provider): string | undefined {
  const parts: string[] = [`size=${top.info().size}`];
  const visit = (p: Provider): boolean => {
    parts.push(`${p.name}@${p.location ?? ''}`);
    if (p.lower) {
      if (!visit(p.lower)) return false;
    } else {
      const v = validatorOf(p);
      if (!v) return false;
      parts.push(v);
    }
    if (p.backing && !visit(p.backing)) return false;
    return true;
  };
  return visit(top) ? parts.join('|') : undefined;
}
