/**
 * The VHD footer ("hard disk footer"): 512 bytes at the end of every image, copied at
 * offset 0 of dynamic and differencing images. Pre-2004 Virtual PC wrote it as 511
 * bytes (the last reserved byte missing); the checksum is the same either way.
 */
import { CorruptImageError } from '../../core/errors';
import { vhdChecksum } from './checksum';
import type { Geometry } from './geometry';

export const FOOTER_SIZE = 512;
export const LEGACY_FOOTER_SIZE = 511;
export const FOOTER_COOKIE = 'conectix';
export const VHD_VERSION = 0x00010000;
/** Fixed disks have no dynamic header: their data offset is all ones. */
export const NO_DATA_OFFSET = 0xffffffffffffffffn;
/** Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC). */
export const VHD_EPOCH = 946684800;

export enum DiskType {
  Fixed = 2,
  Dynamic = 3,
  Differencing = 4,
}

export interface Footer {
  features: number;
  version: number;
  /** Absolute offset of the dynamic header (bigint: fixed disks store all ones). */
  dataOffset: bigint;
  timestamp: number;
  creatorApp: string;
  creatorVersion: number;
  creatorHostOs: string;
  originalSize: number;
  currentSize: number;
  geometry: Geometry;
  diskType: number;
  checksum: number;
  uniqueId: Buffer;
  savedState: number;
  /** Byte 85: blktap's private "hidden" flag (0 elsewhere). Kept as found. */
  hidden: number;
}

export interface FooterCheck {
  footer: Footer;
  /** Problems, each naming its field; empty for a good footer. */
  problems: Array<{ field: string; message: string }>;
}

function ascii(b: Uint8Array): string {
  return Buffer.from(b).toString('latin1');
}

/** Reads the fields and judges them; never throws on content. `bytes` is 511 or 512 long. */
export function inspectFooter(bytes: Uint8Array): FooterCheck {
  const full = Buffer.alloc(FOOTER_SIZE);
  full.set(bytes.subarray(0, FOOTER_SIZE));
  const b = full;
  const footer: Footer = {
    features: b.readUInt32BE(8),
    version: b.readUInt32BE(12),
    dataOffset: b.readBigUInt64BE(16),
    timestamp: b.readUInt32BE(24),
    creatorApp: ascii(b.subarray(28, 32)),
    creatorVersion: b.readUInt32BE(32),
    creatorHostOs: ascii(b.subarray(36, 40)),
    originalSize: Number(b.readBigUInt64BE(40)),
    currentSize: Number(b.readBigUInt64BE(48)),
    geometry: { cylinders: b.readUInt16BE(56), heads: b[58], sectorsPerTrack: b[59] },
    diskType: b.readUInt32BE(60),
    checksum: b.readUInt32BE(64),
    uniqueId: Buffer.from(b.subarray(68, 84)),
    savedState: b[84],
    hidden: b[85],
  };
  const problems: FooterCheck['problems'] = [];
  const cookie = ascii(b.subarray(0, 8));
  if (cookie !== FOOTER_COOKIE) {
    problems.push({ field: 'footer cookie', message: `footer cookie is '${printable(cookie)}', expected 'conectix'` });
    return { footer, problems };
  }
  const computed = vhdChecksum(b, 64);
  if (computed !== footer.checksum) {
    problems.push({ field: 'footer checksum', message: `footer checksum is 0x${hex(footer.checksum)}, the bytes sum to 0x${hex(computed)}` });
  }
  if (footer.version !== VHD_VERSION) {
    problems.push({ field: 'footer version', message: `unsupported footer file format version 0x${hex(footer.version)} (only 1.0 = 0x00010000 is defined)` });
  }
  if (footer.diskType !== DiskType.Fixed && footer.diskType !== DiskType.Dynamic && footer.diskType !== DiskType.Differencing) {
    problems.push({ field: 'disk type', message: `unsupported disk type ${footer.diskType} (2 fixed, 3 dynamic, 4 differencing)` });
  }
  if (!Number.isSafeInteger(footer.currentSize) || footer.currentSize % 512 !== 0) {
    problems.push({ field: 'current size', message: `current size ${b.readBigUInt64BE(48)} is not a whole number of 512-byte sectors below 2^53` });
  }
  return { footer, problems };
}

/** Parses a footer and throws on the first problem. */
export function parseFooter(bytes: Uint8Array, where: string): Footer {
  const { footer, problems } = inspectFooter(bytes);
  if (problems.length) throw new CorruptImageError(problems[0].field, `${where}: ${problems[0].message}`);
  return footer;
}

export function serializeFooter(f: Footer): Buffer {
  const b = Buffer.alloc(FOOTER_SIZE);
  b.write(FOOTER_COOKIE, 0, 'latin1');
  b.writeUInt32BE(f.features >>> 0, 8);
  b.writeUInt32BE(f.version >>> 0, 12);
  b.writeBigUInt64BE(f.dataOffset, 16);
  b.writeUInt32BE(f.timestamp >>> 0, 24);
  b.write(f.creatorApp.padEnd(4, '\0').slice(0, 4), 28, 'latin1');
  b.writeUInt32BE(f.creatorVersion >>> 0, 32);
  b.write(f.creatorHostOs.padEnd(4, '\0').slice(0, 4), 36, 'latin1');
  b.writeBigUInt64BE(BigInt(f.originalSize), 40);
  b.writeBigUInt64BE(BigInt(f.currentSize), 48);
  b.writeUInt16BE(f.geometry.cylinders, 56);
  b[58] = f.geometry.heads;
  b[59] = f.geometry.sectorsPerTrack;
  b.writeUInt32BE(f.diskType, 60);
  b.set(f.uniqueId.subarray(0, 16), 68);
  b[84] = f.savedState;
  b[85] = f.hidden;
  const sum = vhdChecksum(b, 64);
  b.writeUInt32BE(sum, 64);
  f.checksum = sum;
  return b;
}

export function isFooterCookie(bytes: Uint8Array, at = 0): boolean {
  return bytes.length >= at + 8 && ascii(bytes.subarray(at, at + 8)) === FOOTER_COOKIE;
}

export function diskTypeName(type: number): string {
  return type === DiskType.Fixed ? 'fixed' : type === DiskType.Dynamic ? 'dynamic' : type === DiskType.Differencing ? 'differencing' : `unknown (${type})`;
}

export function vhdTimeNow(): number {
  return Math.max(0, Math.floor(Date.now() / 1000) - VHD_EPOCH) >>> 0;
}

export function hex(n: number): string {
  return (n >>> 0).toString(16).padStart(8, '0');
}

export function printable(s: string): string {
  return s.replace(/[^\x20-\x7e]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}
