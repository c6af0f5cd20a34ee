/**
 * Creating images: fixed, dynamic, and differencing children of an existing VHD.
 *
 * Sizes are rounded up to whole sectors and limited to 2040 GiB; the geometry follows the
 * spec's rule. The creator application is 'win ': readers that pick the disk size by
 * creator (qemu) then use the footer's current size, which is the size we mean; with any
 * name they do not know they would use C×H×S×512 and cut the disk short.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockError } from '../../core/errors';
import { DiskType, FOOTER_SIZE, NO_DATA_OFFSET, serializeFooter, VHD_EPOCH, VHD_VERSION, vhdTimeNow, type Footer } from './footer';
import { geometryFor, VHD_MAX_SIZE } from './geometry';
import { DEFAULT_BLOCK_SIZE, HEADER_SIZE, HEADER_VERSION, serializeHeader, type DynamicHeader, type Locator } from './header';
import { locatorPayloads } from './locators';
import { newUuid } from './uuid';

export const CREATOR_APP = 'win ';
export const CREATOR_VERSION = 0x000a0000;
export const CREATOR_OS = 'Wi2k';

export interface CreateOptions {
  size: number;
  type: 'fixed' | 'dynamic';
  blockSize?: number;
}

export interface ParentInfo {
  /** Absolute path of the parent image. */
  path: string;
  uniqueId: Buffer;
  size: number;
  blockSize?: number;
}

export function roundedSize(size: number): number {
  if (!Number.isSafeInteger(size) || size <= 0) throw new BlockError('EINVAL', `disk size must be a positive number of bytes (got ${size})`);
  const rounded = Math.ceil(size / 512) * 512;
  if (rounded > VHD_MAX_SIZE) throw new BlockError('EFBIG', `a VHD holds at most 2040 GiB (${VHD_MAX_SIZE} bytes); ${size} is too large`);
  return rounded;
}

export function checkBlockSize(blockSize: number): void {
  if (!Number.isSafeInteger(blockSize) || blockSize < 512 || blockSize > 2 ** 28 || (blockSize & (blockSize - 1)) !== 0) {
    throw new BlockError('EINVAL', `block size must be a power of two between 512 bytes and 256 MiB (got ${blockSize})`);
  }
}

export function newFooter(size: number, type: DiskType): Footer {
  return {
    features: 2,
    version: VHD_VERSION,
    dataOffset: type === DiskType.Fixed ? NO_DATA_OFFSET : BigInt(FOOTER_SIZE),
    timestamp: vhdTimeNow(),
    creatorApp: CREATOR_APP,
    creatorVersion: CREATOR_VERSION,
    creatorHostOs: CREATOR_OS,
    originalSize: size,
    currentSize: size,
    geometry: geometryFor(size),
    diskType: type,
    checksum: 0,
    uniqueId: newUuid(),
    savedState: 0,
    hidden: 0,
  };
}

function newHeader(size: number, blockSize: number, parent?: ParentInfo): DynamicHeader {
  const entries = Math.ceil(size / blockSize);
  return {
    dataOffset: NO_DATA_OFFSET,
    tableOffset: FOOTER_SIZE + HEADER_SIZE,
    version: HEADER_VERSION,
    maxTableEntries: entries,
    blockSize,
    checksum: 0,
    parentUniqueId: parent ? parent.uniqueId : Buffer.alloc(16),
    parentTimestamp: 0,
    parentName: '',
    locators: [],
  };
}

/** Creates a new image; refuses to overwrite an existing file. Returns the size used. */
export function createImage(file: string, options: CreateOptions): number {
  const size = roundedSize(options.size);
  const fd = openNew(file);
  try {
    if (options.type === 'fixed') {
      const footer = serializeFooter(newFooter(size, DiskType.Fixed));
      fs.ftruncateSync(fd, size);
      writeAll(fd, footer, size);
    } else {
      const blockSize = options.blockSize ?? DEFAULT_BLOCK_SIZE;
      checkBlockSize(blockSize);
      writeDynamic(fd, newFooter(size, DiskType.Dynamic), newHeader(size, blockSize), []);
    }
    fs.fsyncSync(fd);
  } catch (e) {
    fs.closeSync(fd);
    fs.rmSync(file, { force: true });
    throw e;
  }
  fs.closeSync(fd);
  return size;
}

/** Creates a differencing child of `parent` (a VHD): same size, locators to the parent. */
export function createChild(file: string, parent: ParentInfo, blockSize?: number): void {
  const size = parent.size;
  const bs = blockSize ?? parent.blockSize ?? DEFAULT_BLOCK_SIZE;
  checkBlockSize(bs);
  const childPath = path.resolve(file);
  const header = newHeader(size, bs, parent);
  header.parentName = path.basename(parent.path);
  header.parentTimestamp = Math.max(0, Math.floor(fs.statSync(parent.path).mtimeMs / 1000) - VHD_EPOCH) >>> 0;
  const footer = newFooter(size, DiskType.Differencing);
  const fd = openNew(file);
  try {
    writeDynamic(fd, footer, header, locatorPayloads(childPath, parent.path));
    fs.fsyncSync(fd);
  } catch (e) {
    fs.closeSync(fd);
    fs.rmSync(file, { force: true });
    throw e;
  }
  fs.closeSync(fd);
}

/** Layout: footer copy, header, BAT (all unallocated), locator data, footer. */
function writeDynamic(fd: number, footer: Footer, header: DynamicHeader, locators: Array<{ code: string; data: Buffer }>): void {
  const batBytes = Math.ceil((header.maxTableEntries * 4) / 512) * 512;
  let at = header.tableOffset + batBytes;
  const placed: Array<{ at: number; data: Buffer }> = [];
  header.locators = locators.map((l): Locator => {
    const space = Math.ceil(l.data.length / 512) * 512;
    const entry = { code: l.code, dataSpace: space, dataLength: l.data.length, dataOffset: at };
    placed.push({ at, data: l.data });
    at += space;
    return entry;
  });
  const footerBytes = serializeFooter(footer);
  writeAll(fd, footerBytes, 0);
  writeAll(fd, serializeHeader(header), FOOTER_SIZE);
  writeAll(fd, Buffer.alloc(batBytes, 0xff), header.tableOffset);
  for (const p of placed) writeAll(fd, Buffer.concat([p.data, Buffer.alloc(Math.ceil(p.data.length / 512) * 512 - p.data.length)]), p.at);
  writeAll(fd, footerBytes, at);
}

function openNew(file: string): number {
  try {
    return fs.openSync(file, 'wx');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') throw new BlockError('EEXIST', `${file} already exists (tapkit never overwrites an image)`);
    throw new BlockError(code === 'EACCES' ? 'EACCES' : code === 'ENOENT' ? 'ENOENT' : 'EIO', `cannot create ${file}: ${(e as Error).message}`);
  }
}

function writeAll(fd: number, buf: Buffer, position: number): void {
  let done = 0;
  while (done < buf.length) done += fs.writeSync(fd, buf, done, buf.length - done, position + done);
}
