/**
 * Typed block-device errors. Every failure that crosses the provider contract is a
 * BlockError carrying an errno name, so each export can map it to its own wire code
 * (NBD error numbers, blkif BLKIF_RSP_*, a FUSE -errno).
 */

/** The errno names a provider may report. Kept small: exports must map every one. */
export const ERRNO = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  EBADF: 9,
  ENOMEM: 12,
  EACCES: 13,
  EBUSY: 16,
  EEXIST: 17,
  ENODEV: 19,
  EISDIR: 21,
  EINVAL: 22,
  EFBIG: 27,
  ENOSPC: 28,
  EROFS: 30,
  ENOSYS: 38,
  ELOOP: 40,
  EOPNOTSUPP: 95,
  EOVERFLOW: 75,
  ETIMEDOUT: 110,
  ESHUTDOWN: 108,
} as const;

export type ErrnoName = keyof typeof ERRNO;

export class BlockError extends Error {
  readonly code: ErrnoName;
  override readonly name = 'BlockError';

  constructor(code: ErrnoName, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
  }

  /** The Linux errno number for this error (the numbers FUSE and blkif use). */
  get errno(): number {
    return ERRNO[this.code];
  }
}

/**
 * Raised while opening a spec: a bad spec string, an unknown provider, a missing file.
 * `usage` marks errors in what the user typed (CLI exit code 2) as opposed to I/O
 * failures (exit code 1).
 */
export class SpecError extends BlockError {
  readonly usage: boolean;
  constructor(code: ErrnoName, message: string, usage = false, options?: { cause?: unknown }) {
    super(code, message, options);
    this.usage = usage;
  }
}

/** Raised by a format parser that finds an image malformed. Names the offending field. */
export class CorruptImageError extends BlockError {
  readonly field: string;
  /** `code`: EINVAL when an image is refused at open, EIO when a read meets the damage. */
  constructor(field: string, message: string, code: ErrnoName = 'EINVAL') {
    super(code, message);
    this.field = field;
  }
}


/** Maps a Node.js system error (fs, net) to a BlockError, keeping its errno name when we know it. */
export function fromSystemError(e: unknown, context: string): BlockError {
  if (e instanceof BlockError) return e;
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  const message = e instanceof Error ? e.message : String(e);
  if (code && code in ERRNO) return new BlockError(code as ErrnoName, `${context}: ${message}`, { cause: e });
  return new BlockError('EIO', `${context}: ${message}`, { cause: e });
}

/**
 * Wraps whatever a provider threw into a BlockError. Untyped throws (a plain Error, a
 * string) become EIO with the provider's name, so one buggy provider never surfaces as
 * an unexplained crash in an export.
 */
export function asBlockError(e: unknown, providerName: string): BlockError {
  // A BlockError from another copy of tapkit (a plugin's own dependency) keeps its code and message.
  if (e instanceof BlockError || isBlockError(e)) return e as BlockError;
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (typeof code === 'string' && code in ERRNO) return fromSystemError(e, providerName);
  const message = e instanceof Error ? e.message : String(e);
  return new BlockError('EIO', `${providerName}: ${message}`, { cause: e });
}

/** True for a BlockError from this or another copy of tapkit loaded in the process. */
export function isBlockError(e: unknown): e is BlockError {
  return e instanceof BlockError || (e instanceof Error && e.name === 'BlockError' && typeof (e as BlockError).code === 'string');
}
