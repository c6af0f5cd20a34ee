/**
 * What one NBD export offers: its VBD, and the transmission flags and block sizes derived
 * from the VBD's info and capabilities (the server never advertises what the VBD cannot do).
 */
import type { Vbd } from '../vbd';
import {
  TF_CAN_MULTI_CONN, TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_CACHE, TF_SEND_DF, TF_SEND_FAST_ZERO,
  TF_SEND_FLUSH, TF_SEND_FUA, TF_SEND_TRIM, TF_SEND_WRITE_ZEROES,
} from './protocol';

export interface NbdExport {
  /** The export name clients ask for ("" is the default export). */
  name: string;
  vbd: Vbd;
  /** Shown by LIST and INFO (nbdinfo --list). */
  description?: string;
}

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** Transmission flags for an export; DF only once structured replies are agreed. */
export function transmissionFlags(vbd: Vbd, structured: boolean): number {
  const caps = vbd.capabilities();
  const writable = caps.write && !vbd.info().readOnly;
  let flags = TF_HAS_FLAGS | TF_SEND_CACHE;
  if (!writable) flags |= TF_READ_ONLY;
  if (caps.flush) flags |= TF_SEND_FLUSH;
  // FUA is native or emulated by the VBD with a flush after the write.
  if (writable && (caps.fua || caps.flush)) flags |= TF_SEND_FUA;
  if (writable && caps.trim) flags |= TF_SEND_TRIM;
  if (writable && caps.zero) flags |= TF_SEND_WRITE_ZEROES;
  if (writable && caps.zero && vbd.fastZero) flags |= TF_SEND_FAST_ZERO;
  if (structured) flags |= TF_SEND_DF;
  // Every connection to an export shares its one VBD, so the provider's word decides.
  if (caps.multiConn) flags |= TF_CAN_MULTI_CONN;
  return flags;
}

/** Largest power of two that is <= n (n >= 1). */
function floorPow2(n: number): number {
  return 2 ** Math.floor(Math.log2(n));
}

/**
 * Block sizes from the provider's geometry: minimum = logical block size (a power of two,
 * at most 64 KiB), preferred = physical block size (at least 512 and the minimum),
 * maximum = the server's request limit.
 */
export function blockSizes(vbd: Vbd, maxRequest: number): BlockSizes {
  const info = vbd.info();
  const minimum = Math.min(65536, floorPow2(Math.max(1, info.logicalBlockSize || 1)));
  const preferred = Math.max(minimum, 512, floorPow2(Math.max(1, info.physicalBlockSize || 4096)));
  const maximum = Math.max(preferred, Math.min(maxRequest, 0xffffffff));
  return { minimum, preferred, maximum };
}
