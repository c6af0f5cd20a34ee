/**
 * The dynamic disk header ("cxsparse"), 1024 bytes at the footer's data offset of
 * dynamic and differencing images, with the parent's identity and its locators.
 */
import { vhdChecksum } from './checksum';
import { hex, printable } from './footer';

export const HEADER_SIZE = 1024;
export const HEADER_COOKIE = 'cxsparse';
export const HEADER_VERSION = 0x00010000;
export const LOCATOR_COUNT = 8;
export const DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024;

export interface Locator {
  /** Platform code: 'W2ku', 'W2ru', 'MacX', 'Mac ', 'Wi2k', 'Wi2r', or '' when unused. */
  code: string;
  /** Spec: sectors reserved; Hyper-V and blktap store bytes. Never trusted for sizes. */
  dataSpace: number;
  dataLength: number;
  dataOffset: number;
}

export interface DynamicHeader {
  dataOffset: bigint;
  tableOffset: number;
  version: number;
  maxTableEntries: number;
  blockSize: number;
  checksum: number;
  parentUniqueId: Buffer;
  parentTimestamp: number;
  /** Decoded from UTF-16 big-endian, NULs stripped. */
  parentName: string;
  locators: Locator[];
}

export interface HeaderCheck {
  header: DynamicHeader;
  problems: Array<{ field: string; message: string }>;
}

export function inspectHeader(bytes: Uint8Array): HeaderCheck {
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
  const locators: Locator[] = [];
  for (let i = 0; i < LOCATOR_COUNT; i++) {
    const at = 576 + i * 24;
    const codeValue = b.readUInt32BE(at);
    locators.push({
      code: codeValue === 0 ? '' : b.toString('latin1', at, at + 4),
      dataSpace: b.readUInt32BE(at + 4),
      dataLength: b.readUInt32BE(at + 8),
      dataOffset: Number(b.readBigUInt64BE(at + 16)),
    });
  }
  const header: DynamicHeader = {
    dataOffset: b.readBigUInt64BE(8),
    tableOffset: Number(b.readBigUInt64BE(16)),
    version: b.readUInt32BE(24),
    maxTableEntries: b.readUInt32BE(28),
    blockSize: b.readUInt32BE(32),
    checksum: b.readUInt32BE(36),
    parentUniqueId: Buffer.from(b.subarray(40, 56)),
    parentTimestamp: b.readUInt32BE(56),
    parentName: decodeUtf16be(b.subarray(64, 576)),
    locators,
  };
  const problems: HeaderCheck['problems'] = [];
  const cookie = b.toString('latin1', 0, 8);
  if (cookie !== HEADER_COOKIE) {
    problems.push({ field: 'dynamic header cookie', message: `dynamic header cookie is '${printable(cookie)}', expected 'cxsparse'` });
    return { header, problems };
  }
  const computed = vhdChecksum(b, 36);
  if (computed !== header.checksum) {
    problems.push({ field: 'dynamic header checksum', message: `dynamic header checksum is 0x${hex(header.checksum)}, the bytes sum to 0x${hex(computed)}` });
  }
  if (header.version !== HEADER_VERSION) {
    problems.push({ field: 'dynamic header version', message: `unsupported dynamic header version 0x${hex(header.version)} (only 1.0 = 0x00010000 is defined)` });
  }
  const bs = header.blockSize;
  if (bs < 512 || (bs & (bs - 1)) !== 0) {
    problems.push({ field: 'block size', message: `block size ${bs} is not a power of two of at least 512 bytes` });
  }
  if (!Number.isSafeInteger(header.tableOffset) || header.tableOffset % 512 !== 0) {
    problems.push({ field: 'table offset', message: `BAT offset ${b.readBigUInt64BE(16)} is not a sector-aligned offset below 2^53` });
  }
  return { header, problems };
}

export function serializeHeader(h: DynamicHeader): Buffer {
  const b = Buffer.alloc(HEADER_SIZE);
  b.write(HEADER_COOKIE, 0, 'latin1');
  b.writeBigUInt64BE(h.dataOffset, 8);
  b.writeBigUInt64BE(BigInt(h.tableOffset), 16);
  b.writeUInt32BE(h.version, 24);
  b.writeUInt32BE(h.maxTableEntries >>> 0, 28);
  b.writeUInt32BE(h.blockSize >>> 0, 32);
  b.set(h.parentUniqueId.subarray(0, 16), 40);
  b.writeUInt32BE(h.parentTimestamp >>> 0, 56);
  b.set(encodeUtf16be(h.parentName).subarray(0, 512), 64);
  h.locators.forEach((l, i) => {
    if (i >= LOCATOR_COUNT || !l.code) return;
    const at = 576 + i * 24;
    b.write(l.code.padEnd(4, '\0').slice(0, 4), at, 'latin1');
    b.writeUInt32BE(l.dataSpace >>> 0, at + 4);
    b.writeUInt32BE(l.dataLength >>> 0, at + 8);
    b.writeBigUInt64BE(BigInt(l.dataOffset), at + 16);
  });
  const sum = vhdChecksum(b, 36);
  b.writeUInt32BE(sum, 36);
  h.checksum = sum;
  return b;
}

export function decodeUtf16be(bytes: Uint8Array): string {
  const even = Buffer.from(bytes.subarray(0, bytes.length & ~1));
  const swapped = Buffer.from(even).swap16();
  return swapped.toString('utf16le').replace(/\0+$/, '').split('\0')[0];
}

export function encodeUtf16be(text: string): Buffer {
  return Buffer.from(text, 'utf16le').swap16();
}
