/**
 * Mutations of an image's bytes: blind (bytes anywhere, biased to where metadata lives,
 * truncation) and structure-aware (header fields, table entries, extension lengths,
 * locators, backing names planted from a list of hostile ones). A mutation is plain data
 * (fast-check prints it in a counterexample) interpreted against the image's pristine
 * bytes: indexes wrap around the entries the image really has.
 */
import fc from 'fast-check';
import * as path from 'node:path';

/** A value chosen relative to what the field holds: `pick` selects the strategy. */
export interface Interesting {
  pick: number;
  raw: bigint;
}

export type Mutation =
  | { kind: 'bytes'; region: 'head' | 'tail' | 'anywhere'; at: number; values: number[] }
  | { kind: 'truncate'; fraction: number }
  | { kind: 'field'; index: number; value: Interesting; target: number; fixChecksum: boolean }
  | { kind: 'entry'; table: number; index: number; value: Interesting; fixChecksum: boolean }
  | { kind: 'extension'; index: number; value: Interesting }
  | { kind: 'name'; name: number; fixChecksum: boolean }
  | { kind: 'locator'; index: number; field: number; value: Interesting; fixChecksum: boolean };

/** What names and sizes a mutation may refer to. */
export interface MutationContext {
  /** The mutated file's path (for names that loop back to it). */
  file: string;
  /** The canary outside the tree. */
  canary: string;
}

const interesting = fc.record({ pick: fc.nat({ max: 15 }), raw: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }) });

export const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('bytes' as const), region: fc.constantFrom('head' as const, 'tail' as const, 'anywhere' as const), at: fc.nat(), values: fc.array(fc.nat({ max: 255 }), { minLength: 1, maxLength: 8 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('truncate' as const), fraction: fc.double({ min: 0, max: 1, noNaN: true }) }) },
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('field' as const), index: fc.nat(), value: interesting, target: fc.nat({ max: 2 }), fixChecksum: fc.boolean() }) },
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('entry' as const), table: fc.nat(), index: fc.nat({ max: 4095 }), value: interesting, fixChecksum: fc.boolean() }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('extension' as const), index: fc.nat({ max: 7 }), value: interesting }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('name' as const), name: fc.nat(), fixChecksum: fc.boolean() }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('locator' as const), index: fc.nat({ max: 7 }), field: fc.nat({ max: 3 }), value: interesting, fixChecksum: fc.boolean() }) },
);

/** Several mutations of one file of the chain. */
export const caseArb = fc.record({ file: fc.nat(), mutations: fc.array(mutationArb, { minLength: 1, maxLength: 4 }) });

/** Names an attacker would plant: every one outside the chain, a loop, or nonsense. */
export function hostileNames(ctx: MutationContext): string[] {
  const self = path.basename(ctx.file);
  return [
    '/etc/passwd',
    '../canary.raw',
    ctx.canary,
    `file://${ctx.canary}`,
    'link.raw',
    '/dev/zero',
    '/proc/self/mem',
    self,
    `a/${self}`,
    `./a/a/${self}`,
    'http://127.0.0.1:1/x.qcow2',
    'missing.qcow2',
    '',
    '..',
    'images/../../canary.raw',
  ];
}

/** The value an Interesting picks for a field of `bits` bits that now holds `original`. */
export function pickValue(v: Interesting, original: bigint, bits: number, fileSize: number, unit: number): bigint {
  const mask = bits >= 64 ? (1n << 64n) - 1n : (1n << BigInt(bits)) - 1n;
  const size = BigInt(fileSize);
  const u = BigInt(unit);
  const candidates = [
    0n,
    1n,
    mask,
    original + 1n,
    original - 1n,
    original * 2n,
    original / 2n,
    1n << (v.raw % BigInt(bits)),
    size,
    size - u,
    size + u,
    (v.raw % (size + 1n)) / u * u,
    original ^ (1n << (v.raw % BigInt(bits))),
    v.raw,
    mask >> 1n,
    original + u,
  ];
  return candidates[v.pick % candidates.length] & mask;
}

export function writeUint(bytes: Buffer, at: number, width: number, value: bigint): void {
  if (at < 0 || at + width > bytes.length) return;
  for (let i = width - 1; i >= 0; i--) {
    bytes[at + i] = Number(value & 0xffn);
    value >>= 8n;
  }
}

export function readUint(bytes: Buffer, at: number, width: number): bigint {
  if (at < 0 || at + width > bytes.length) return 0n;
  let value = 0n;
  for (let i = 0; i < width; i++) value = (value << 8n) | BigInt(bytes[at + i]);
  return value;
}

/** Blind mutations every format shares; returns the (possibly shortened) bytes, or undefined when not blind. */
export function applyBlind(bytes: Buffer, m: Mutation): Buffer | undefined {
  if (m.kind === 'truncate') return bytes.subarray(0, Math.floor(bytes.length * m.fraction));
  if (m.kind !== 'bytes') return undefined;
  if (bytes.length === 0) return bytes;
  const span = Math.min(bytes.length, 65536);
  const at = m.region === 'head' ? m.at % span : m.region === 'tail' ? bytes.length - 1 - (m.at % span) : m.at % bytes.length;
  m.values.forEach((value, i) => {
    if (at + i < bytes.length) bytes[at + i] = value;
  });
  return bytes;
}
