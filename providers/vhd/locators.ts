/**
 * Parent locators of differencing images: decoding the names they hold (W2ru relative,
 * W2ku absolute, MacX file:// URL) into candidate names for the registry, and building
 * them for a new child.
 *
 * Encodings (formats.md 1.8): W2ku/W2ru payloads are UTF-16 little-endian, MacX is a
 * UTF-8 URL, the header's parent name is UTF-16 big-endian. "Data space" is sectors in
 * the spec and bytes in Hyper-V and blktap: we read `data length` bytes and never size
 * anything from data space.
 */
import * as path from 'node:path';
import type { Provider } from '../../core/provider';
import type { DynamicHeader, Locator } from './header';

/** A locator's payload is a path: a few KiB at most. */
const MAX_LOCATOR_BYTES = 64 * 1024;

export interface ParentCandidate {
  /** Where the name came from: 'W2ru', 'W2ku', 'MacX', 'parent name'. */
  source: string;
  /** A path, relative to the child's directory or absolute. */
  name: string;
}

/** Windows path → our path: backslashes become slashes, a drive letter is dropped, `.\` stripped. */
export function windowsPathToLocal(text: string): string {
  let p = text.replace(/\0+$/, '').replace(/\\/g, '/');
  p = p.replace(/^[A-Za-z]:(?=\/)/, '');
  if (p.startsWith('./')) p = p.slice(2);
  return p;
}

/** MacX: `file://./rel/path`, `file:///abs/path` or a bare path; percent-decoded. */
export function macUrlToLocal(text: string): string {
  let p = text.replace(/\0+$/, '');
  if (p.startsWith('file://')) p = p.slice('file://'.length);
  try {
    p = decodeURIComponent(p);
  } catch {
    // A malformed escape is kept as it is.
  }
  if (p.startsWith('./')) p = p.slice(2);
  return p;
}

/** The names to try for the parent, best first: relative locators, MacX, absolute, the header's name. */
export async function parentCandidates(lower: Provider, header: DynamicHeader, fileEnd: number): Promise<ParentCandidate[]> {
  const byCode = new Map<string, string[]>();
  for (const l of header.locators) {
    if (!['W2ru', 'W2ku', 'MacX'].includes(l.code)) continue;
    const text = await readLocator(lower, l, fileEnd);
    if (!text) continue;
    const name = l.code === 'MacX' ? macUrlToLocal(text) : windowsPathToLocal(text);
    if (!name) continue;
    byCode.set(l.code, [...(byCode.get(l.code) ?? []), name]);
  }
  const out: ParentCandidate[] = [];
  const add = (source: string, name: string) => {
    if (!out.some((c) => c.name === name)) out.push({ source, name });
  };
  for (const code of ['W2ru', 'MacX', 'W2ku']) for (const name of byCode.get(code) ?? []) add(code, name);
  if (header.parentName) {
    // libvhdi's fallback: the base name of the parent's name, next to the child.
    const base = path.basename(windowsPathToLocal(header.parentName));
    if (base) add('parent name', base);
  }
  return out;
}

async function readLocator(lower: Provider, l: Locator, fileEnd: number): Promise<string | undefined> {
  if (l.dataLength === 0 || l.dataLength > MAX_LOCATOR_BYTES) return undefined;
  if (l.dataOffset < 512 || l.dataOffset + l.dataLength > fileEnd) return undefined;
  const buf = Buffer.alloc(l.dataLength);
  await lower.read(buf, l.dataOffset);
  return l.code === 'MacX' ? buf.toString('utf8') : buf.subarray(0, buf.length & ~1).toString('utf16le');
}

/** Locator payloads for a new child: W2ru (relative), W2ku (absolute), MacX (relative URL). */
export function locatorPayloads(childPath: string, parentPath: string): Array<{ code: string; data: Buffer }> {
  let relative = path.relative(path.dirname(childPath), parentPath);
  if (!relative.startsWith('..')) relative = `./${relative}`;
  const windowsRelative = relative.replace(/\//g, '\\');
  return [
    { code: 'W2ru', data: Buffer.from(windowsRelative, 'utf16le') },
    { code: 'W2ku', data: Buffer.from(parentPath.replace(/\//g, '\\'), 'utf16le') },
    { code: 'MacX', data: Buffer.from(`file://${encodeURI(relative)}`, 'utf8') },
  ];
}
