/**
 * Spec strings: how a user names a disk.
 *
 *   memory:1G                      a source with its argument
 *   memory,limit=512M:1T           options between the name and the colon
 *   raw:/dev/sdb                   an explicit source over a path
 *   /images/a.vhd                  a bare path: opened raw, its format probed
 *   vhd:/images/a.vhd              a format over a source (a bare path here is not probed)
 *   qcow2:https://host/base.qcow2  a format over a URL source
 *   cache,size=256M:vhd:/a.vhd     a filter on top of a chain
 *
 * A bare word without a colon is a relative path; `./a:b` names a file with a colon.
 */
import { SpecError } from './errors';

export type ParsedSpec =
  | { type: 'named'; name: string; options: Record<string, string>; arg: string }
  | { type: 'url'; scheme: string; url: string }
  | { type: 'path'; path: string };

const URL_RE = /^([A-Za-z][A-Za-z0-9+.-]*):\/\//;
const NAMED_RE = /^([A-Za-z][A-Za-z0-9_-]*)((?:,[^:,]*)*):([\s\S]*)$/;

export function parseSpec(text: string): ParsedSpec {
  if (text.length === 0) throw new SpecError('EINVAL', 'empty spec', true);
  const url = URL_RE.exec(text);
  if (url) return { type: 'url', scheme: url[1].toLowerCase(), url: text };
  const named = NAMED_RE.exec(text);
  if (named) {
    const options: Record<string, string> = {};
    for (const pair of named[2].split(',').slice(1)) {
      const eq = pair.indexOf('=');
      if (eq <= 0) throw new SpecError('EINVAL', `malformed option '${pair}' in spec '${text}' (expected key=value)`, true);
      options[pair.slice(0, eq)] = pair.slice(eq + 1);
    }
    return { type: 'named', name: named[1], options, arg: named[3] };
  }
  return { type: 'path', path: text };
}

/** Splits `cache,size=64M` (a `--filter` argument) into a name and options. */
export function parseFilterArg(text: string): { name: string; options: Record<string, string> } {
  const parsed = parseSpec(`${text}:`);
  if (parsed.type !== 'named') throw new SpecError('EINVAL', `malformed filter '${text}'`, true);
  return { name: parsed.name, options: parsed.options };
}
