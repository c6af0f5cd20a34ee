/**
 * Resource limits against hostile images: one place that holds every bound a header
 * field is checked against before anything is allocated from it. An image that asks for
 * more fails with a `LimitError` naming the limit and the flag that raises it
 * (`--limit NAME=VALUE`, repeatable, on every command that opens a disk).
 *
 * Formats read the limits through `OpenRequest.limits`, and charge the metadata they keep
 * in memory (L1 tables, BATs, caches) to `OpenRequest.memory`, one budget shared by the
 * whole chain of one VBD.
 */
import { CorruptImageError, type ErrnoName } from './errors';
import { formatSize, parseSize } from './size';

const KiB = 1024;
const MiB = 1024 * KiB;

interface LimitDefinition {
  /** Default value. */
  value: number;
  unit: 'bytes' | 'count';
  /** What it bounds, for `--help` and errors. */
  description: string;
}

export const LIMIT_DEFINITIONS = {
  'chain-depth': { value: 16, unit: 'count', description: 'backing files (and data files, parents) below the image named' },
  'metadata-memory': { value: 256 * MiB, unit: 'bytes', description: 'metadata one VBD keeps in memory over its whole chain: L1 tables, BATs, L2 and bitmap caches' },
  'l1-size': { value: 32 * MiB, unit: 'bytes', description: 'one qcow2 L1 table (active or snapshot)' },
  'bat-entries': { value: 4 * MiB, unit: 'count', description: 'entries of one VHD block allocation table (4 Mi: 2 TiB at 512 KiB blocks)' },
  'header-extensions': { value: 64, unit: 'count', description: 'qcow2 header extensions in one image' },
  'header-extension-size': { value: 64 * KiB, unit: 'bytes', description: 'one qcow2 header extension' },
  snapshots: { value: 65536, unit: 'count', description: 'qcow2 internal snapshots in one image' },
  'snapshot-table-size': { value: 64 * MiB, unit: 'bytes', description: 'one qcow2 snapshot table' },
  'locator-size': { value: 64 * KiB, unit: 'bytes', description: 'one VHD parent locator payload' },
} as const satisfies Record<string, LimitDefinition>;

export type LimitName = keyof typeof LIMIT_DEFINITIONS;
export type LimitValues = Record<LimitName, number>;

export function isLimitName(name: string): name is LimitName {
  return Object.hasOwn(LIMIT_DEFINITIONS, name);
}

/** A header asked for more than a limit allows. Also a CorruptImageError naming the image field. */
export class LimitError extends CorruptImageError {
  readonly limit: LimitName;
  constructor(limit: LimitName, field: string, message: string, code: ErrnoName = 'EFBIG') {
    super(field, message, code);
    this.limit = limit;
  }
}

/** How a limit value reads in a message: `32 MiB` for bytes, `65536` for counts. */
export function formatLimit(name: LimitName, value: number): string {
  return LIMIT_DEFINITIONS[name].unit === 'bytes' ? formatSize(value) : String(value);
}

/** The hint every limit error ends with. */
export function raiseHint(name: LimitName): string {
  return `limit ${name}; raise it with --limit ${name}=${LIMIT_DEFINITIONS[name].unit === 'bytes' ? 'SIZE' : 'N'}`;
}

export class Limits {
  readonly values: Readonly<LimitValues>;

  constructor(overrides: Partial<LimitValues> = {}) {
    const values = {} as LimitValues;
    for (const name of Object.keys(LIMIT_DEFINITIONS) as LimitName[]) values[name] = overrides[name] ?? LIMIT_DEFINITIONS[name].value;
    this.values = Object.freeze(values);
  }

  get(name: LimitName): number {
    return this.values[name];
  }

  /**
   * Throws a LimitError when `value` exceeds the limit. `message` says what the image asks
   * for (`qcow2: L1 table of 268435456 entries`); the error adds the limit and the hint.
   */
  check(name: LimitName, value: number, field: string, message: string): void {
    const limit = this.values[name];
    if (value <= limit) return;
    throw new LimitError(name, field, `${message} is larger than the ${formatLimit(name, limit)} limit (${raiseHint(name)})`);
  }
}

export const DEFAULT_LIMITS = new Limits();

/** `NAME=VALUE` from the command line (sizes take K/M/G suffixes). */
export function parseLimitFlag(text: string): [LimitName, number] {
  const eq = text.indexOf('=');
  const name = eq < 0 ? text : text.slice(0, eq);
  if (!isLimitName(name) || eq < 0) {
    throw new RangeError(`--limit takes NAME=VALUE with NAME one of ${Object.keys(LIMIT_DEFINITIONS).join(', ')} (got '${text}')`);
  }
  const raw = text.slice(eq + 1);
  const value = LIMIT_DEFINITIONS[name].unit === 'bytes' ? parseSize(raw, `--limit ${name}`) : Number(raw);
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`--limit ${name} must be a whole number (got '${raw}')`);
  return [name, value];
}

/**
 * The metadata memory of one VBD: every format in its chain reserves what it keeps
 * (tables read at open, cache bounds) before allocating it.
 */
export class MetadataBudget {
  private used = 0;

  constructor(readonly limit: number = LIMIT_DEFINITIONS['metadata-memory'].value) {}

  get reserved(): number {
    return this.used;
  }

  /** Reserves `bytes` for `what` (`qcow2 /x.qcow2: L1 table`), or throws ENOMEM naming the limit. */
  reserve(bytes: number, what: string): void {
    if (this.used + bytes > this.limit) {
      throw new LimitError(
        'metadata-memory',
        'metadata',
        `${what} needs ${formatSize(bytes)} of metadata memory, and the chain already holds ${formatSize(this.used)} of the ${formatSize(this.limit)} limit (${raiseHint('metadata-memory')})`,
        'ENOMEM',
      );
    }
    this.used += bytes;
  }

  release(bytes: number): void {
    this.used = Math.max(0, this.used - bytes);
  }
}
