/**
 * NBD wire constants (fixed newstyle handshake, transmission, structured replies) and
 * the mapping from tapkit's BlockError codes to NBD error numbers.
 *
 * Values are the protocol's (NetworkBlockDevice/nbd doc/proto.md); every integer on the
 * wire is big-endian.
 */
import type { ErrnoName } from '../errors';

// ---- handshake ----------------------------------------------------------------------

/** "NBDMAGIC": the first 8 bytes from the server. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": second half of the greeting and prefix of every client option. */
export const IHAVEOPT = 0x49484156454f5054n;
/** Prefix of every fixed-newstyle option reply. */
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;

/** Handshake flags (server, u16). */
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
/** Client flags (u32). */
export const CLIENT_FIXED_NEWSTYLE = 1 << 0;
export const CLIENT_NO_ZEROES = 1 << 1;

export const enum Opt {
  EXPORT_NAME = 1,
  ABORT = 2,
  LIST = 3,
  STARTTLS = 5,
  INFO = 6,
  GO = 7,
  STRUCTURED_REPLY = 8,
  LIST_META_CONTEXT = 9,
  SET_META_CONTEXT = 10,
  EXTENDED_HEADERS = 11,
}

/** Option reply types; errors have bit 31 set. */
export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_INFO = 3;
export const REP_META_CONTEXT = 4;
const REP_ERR = 0x80000000;
export const ERR_UNSUP = REP_ERR + 1;
export const ERR_POLICY = REP_ERR + 2;
export const ERR_INVALID = REP_ERR + 3;
export const ERR_PLATFORM = REP_ERR + 4;
export const ERR_TLS_REQD = REP_ERR + 5;
export const ERR_UNKNOWN = REP_ERR + 6;
export const ERR_SHUTDOWN = REP_ERR + 7;
export const ERR_BLOCK_SIZE_REQD = REP_ERR + 8;
export const ERR_TOO_BIG = REP_ERR + 9;

/** Info types carried in REP_INFO. */
export const INFO_EXPORT = 0;
export const INFO_NAME = 1;
export const INFO_DESCRIPTION = 2;
export const INFO_BLOCK_SIZE = 3;

// ---- transmission -------------------------------------------------------------------

export const TF_HAS_FLAGS = 1 << 0;
export const TF_READ_ONLY = 1 << 1;
export const TF_SEND_FLUSH = 1 << 2;
export const TF_SEND_FUA = 1 << 3;
export const TF_ROTATIONAL = 1 << 4;
export const TF_SEND_TRIM = 1 << 5;
export const TF_SEND_WRITE_ZEROES = 1 << 6;
export const TF_SEND_DF = 1 << 7;
export const TF_CAN_MULTI_CONN = 1 << 8;
export const TF_SEND_CACHE = 1 << 10;
export const TF_SEND_FAST_ZERO = 1 << 11;

export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Compact request header: magic, flags, type, cookie, offset, length. */
export const REQUEST_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const CHUNK_HEADER_SIZE = 20;

export const enum Cmd {
  READ = 0,
  WRITE = 1,
  DISC = 2,
  FLUSH = 3,
  TRIM = 4,
  CACHE = 5,
  WRITE_ZEROES = 6,
  BLOCK_STATUS = 7,
}

export const CMD_FLAG_FUA = 1 << 0;
export const CMD_FLAG_NO_HOLE = 1 << 1;
export const CMD_FLAG_DF = 1 << 2;
export const CMD_FLAG_REQ_ONE = 1 << 3;
export const CMD_FLAG_FAST_ZERO = 1 << 4;

/** Flags each command accepts (FUA is accepted on every command, as the spec asks). */
export const ALLOWED_FLAGS: Record<number, number> = {
  [Cmd.READ]: CMD_FLAG_FUA | CMD_FLAG_DF,
  [Cmd.WRITE]: CMD_FLAG_FUA,
  [Cmd.DISC]: CMD_FLAG_FUA,
  [Cmd.FLUSH]: CMD_FLAG_FUA,
  [Cmd.TRIM]: CMD_FLAG_FUA,
  [Cmd.CACHE]: CMD_FLAG_FUA,
  [Cmd.WRITE_ZEROES]: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
  [Cmd.BLOCK_STATUS]: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
};

/** Structured reply chunk flag and types. */
export const REPLY_FLAG_DONE = 1 << 0;
export const REPLY_NONE = 0;
export const REPLY_OFFSET_DATA = 1;
export const REPLY_OFFSET_HOLE = 2;
export const REPLY_BLOCK_STATUS = 5;
export const REPLY_ERROR = 0x8001;
export const REPLY_ERROR_OFFSET = 0x8002;

/** The one metadata context tapkit serves, and the id it is given on SET_META_CONTEXT. */
export const BASE_ALLOCATION = 'base:allocation';
export const BASE_ALLOCATION_ID = 1;
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;

// ---- errors -------------------------------------------------------------------------

export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/**
 * The NBD error for a BlockError code. The protocol allows few values: ENOTSUP only for a
 * FAST_ZERO that cannot be fast and EOVERFLOW only for a too-large DF read; elsewhere
 * both become EINVAL, as clients expect.
 */
export function nbdErrorFor(code: ErrnoName, context: { fastZero?: boolean; df?: boolean } = {}): number {
  switch (code) {
    case 'EPERM':
    case 'EROFS':
    case 'EACCES':
      return NBD_EPERM;
    case 'ENOMEM':
      return NBD_ENOMEM;
    case 'EINVAL':
      return NBD_EINVAL;
    case 'ENOSPC':
    case 'EFBIG':
      return NBD_ENOSPC;
    case 'EOVERFLOW':
      return context.df ? NBD_EOVERFLOW : NBD_EINVAL;
    case 'EOPNOTSUPP':
    case 'ENOSYS':
      return context.fastZero ? NBD_ENOTSUP : NBD_EINVAL;
    case 'ESHUTDOWN':
      return NBD_ESHUTDOWN;
    default:
      return NBD_EIO;
  }
}

/** Option names for log messages. */
export function optionName(option: number): string {
  const names: Record<number, string> = {
    1: 'EXPORT_NAME', 2: 'ABORT', 3: 'LIST', 5: 'STARTTLS', 6: 'INFO', 7: 'GO',
    8: 'STRUCTURED_REPLY', 9: 'LIST_META_CONTEXT', 10: 'SET_META_CONTEXT', 11: 'EXTENDED_HEADERS',
  };
  return names[option] ?? `option ${option}`;
}
