/**
 * Reading an image's metadata from its lower provider and judging it: where the footer
 * is, the dynamic header, the BAT, and whether every BAT entry points to a block that
 * lies in the file without touching the metadata or another block.
 *
 * One walk serves two callers: `open` (stop at the first problem, throw a
 * CorruptImageError naming the field) and `tapkit vhd check` (list every problem).
 * Every size that comes from the image is bounded before anything is allocated from it.
 */
import { CorruptImageError } from '../../core/errors';
import type { Provider } from '../../core/provider';
import { bitmapBytesFor } from './bitmap';
import { DiskType, FOOTER_SIZE, inspectFooter, isFooterCookie, LEGACY_FOOTER_SIZE, NO_DATA_OFFSET, type Footer } from './footer';
import { HEADER_SIZE, inspectHeader, type DynamicHeader } from './header';

export const UNALLOCATED = 0xffffffff;
/** The largest BAT we accept: 2^26 entries (256 MiB of table, 128 TiB at 2 MiB blocks). */
export const MAX_BAT_ENTRIES = 2 ** 26;
/** The largest block we accept (the bitmap and reads are sized from it). */
export const MAX_BLOCK_SIZE = 2 ** 30;

export interface Problem {
  field: string;
  message: string;
}

export interface VhdLayout {
  fileSize: number;
  footer: Footer;
  /** Where the authoritative footer lies (EOF-512, or EOF-511 for a legacy footer). */
  footerOffset: number;
  legacyFooter: boolean;
  /** The EOF footer was damaged and the copy at offset 0 is in use. */
  footerFromCopy: boolean;
  /** Dynamic and differencing images only. */
  header?: DynamicHeader;
  bat?: Uint32Array;
  /** Bytes of the BAT on disk (entries × 4, padded to 512). */
  batBytes: number;
  bitmapBytes: number;
  /** End of the metadata (header, BAT, locator data) and of every block: where a new block may go. */
  dataEnd: number;
  /** Bytes of blktap's batmap after the BAT, when one is present. */
  batmap?: { headerOffset: number; mapOffset: number; mapSectors: number };
}

export interface LoadOptions {
  /** List problems instead of throwing at the first. */
  collect?: Problem[];
  warn?: (message: string) => void;
}

class Stop extends Error {}

export async function loadLayout(lower: Provider, where: string, options: LoadOptions = {}): Promise<VhdLayout> {
  const problems = options.collect;
  const fail = (field: string, message: string): void => {
    if (problems) problems.push({ field, message: `${message}` });
    else throw new CorruptImageError(field, `${where}: ${message}`);
  };
  const fatal = (field: string, message: string): never => {
    fail(field, message);
    throw new Stop();
  };
  try {
    return await walk(lower, fail, fatal, options);
  } catch (e) {
    if (e instanceof Stop) throw new CorruptImageError(problems![problems!.length - 1].field, `${where}: ${problems![problems!.length - 1].message}`);
    throw e;
  }
}

async function readAt(lower: Provider, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  await lower.read(buf, offset);
  return buf;
}

async function walk(
  lower: Provider,
  fail: (field: string, message: string) => void,
  fatal: (field: string, message: string) => never,
  options: LoadOptions,
): Promise<VhdLayout> {
  // A repairable problem: listed by check, a warning when opening.
  const note = (field: string, message: string): void => {
    if (options.collect) options.collect.push({ field, message });
    else options.warn?.(message);
  };
  const fileSize = lower.info().size;
  if (fileSize < LEGACY_FOOTER_SIZE) fatal('footer cookie', `file of ${fileSize} bytes is too short to hold a VHD footer`);

  // ---- the footer: at EOF (512, or 511 on pre-2004 files), else the copy at offset 0.
  const tail = await readAt(lower, Math.max(0, fileSize - 1024), Math.min(1024, fileSize));
  let footerOffset = fileSize - FOOTER_SIZE;
  let legacyFooter = false;
  let endBytes: Uint8Array | undefined;
  if (fileSize >= FOOTER_SIZE && isFooterCookie(tail, tail.length - FOOTER_SIZE)) {
    endBytes = tail.subarray(tail.length - FOOTER_SIZE);
  } else if (isFooterCookie(tail, tail.length - LEGACY_FOOTER_SIZE)) {
    footerOffset = fileSize - LEGACY_FOOTER_SIZE;
    legacyFooter = true;
    endBytes = tail.subarray(tail.length - LEGACY_FOOTER_SIZE);
  }
  const atEnd = endBytes ? inspectFooter(endBytes) : undefined;
  let footer: Footer;
  let footerFromCopy = false;
  if (atEnd && atEnd.problems.length === 0) {
    footer = atEnd.footer;
  } else {
    const head = fileSize >= 2 * FOOTER_SIZE ? await readAt(lower, 0, FOOTER_SIZE) : undefined;
    const copy = head && isFooterCookie(head) ? inspectFooter(head) : undefined;
    const copyUsable = copy && copy.problems.length === 0 && copy.footer.diskType !== DiskType.Fixed;
    if (!copyUsable) {
      if (atEnd) {
        const both = copy ? ' and the copy at offset 0 is bad too' : ' and there is no copy at offset 0';
        fatal(atEnd.problems[0].field, `${atEnd.problems[0].message}${both}`);
      }
      fatal('footer cookie', `no VHD footer: the last 512 bytes do not start with 'conectix'${copy ? ' and the copy at offset 0 is bad' : ''}`);
    }
    footer = copy!.footer;
    footerFromCopy = true;
    if (atEnd) note(atEnd.problems[0].field, `the footer at the end is damaged (${atEnd.problems[0].message}); using the copy at offset 0`);
    else note('footer cookie', `no footer at the end of the file (a torn write?); using the footer copy at offset 0`);
  }

  const base: VhdLayout = {
    fileSize,
    footer,
    footerOffset,
    legacyFooter,
    footerFromCopy,
    batBytes: 0,
    bitmapBytes: 0,
    dataEnd: 0,
  };

  if (footer.diskType === DiskType.Fixed) {
    if (footer.currentSize > footerOffset) {
      fatal('current size', `fixed disk of ${footer.currentSize} bytes does not fit in a file of ${fileSize} bytes`);
    }
    base.dataEnd = footer.currentSize;
    return base;
  }

  // ---- the dynamic header.
  if (footer.dataOffset === NO_DATA_OFFSET || footer.dataOffset > BigInt(footerOffset - HEADER_SIZE) || footer.dataOffset < BigInt(FOOTER_SIZE) || footer.dataOffset % 512n !== 0n) {
    fatal('data offset', `data offset ${footer.dataOffset === NO_DATA_OFFSET ? 'is all ones' : footer.dataOffset} points nowhere: a ${footer.diskType === DiskType.Dynamic ? 'dynamic' : 'differencing'} disk needs its header at a sector between 512 and ${footerOffset - HEADER_SIZE}`);
  }
  const headerOffset = Number(footer.dataOffset);
  const { header, problems: headerProblems } = inspectHeader(await readAt(lower, headerOffset, HEADER_SIZE));
  if (headerProblems.length) {
    if (headerProblems[0].field === 'dynamic header cookie') fatal('data offset', `data offset ${headerOffset} points nowhere: ${headerProblems[0].message}`);
    for (const p of headerProblems.slice(0, -1)) fail(p.field, p.message);
    const last = headerProblems[headerProblems.length - 1];
    fatal(last.field, last.message);
  }
  base.header = header;
  if (header.blockSize > MAX_BLOCK_SIZE) fatal('block size', `block size ${header.blockSize} is larger than the ${MAX_BLOCK_SIZE} bytes tapkit accepts`);
  const blockSize = header.blockSize;
  const bitmapBytes = bitmapBytesFor(blockSize);
  base.bitmapBytes = bitmapBytes;

  // ---- the BAT, bounded before it is read.
  const needed = Math.ceil(footer.currentSize / blockSize);
  const entries = header.maxTableEntries;
  if (entries < needed) fatal('max table entries', `the BAT has ${entries} entries but a disk of ${footer.currentSize} bytes in ${blockSize}-byte blocks needs ${needed}`);
  if (entries > MAX_BAT_ENTRIES) fatal('max table entries', `the BAT claims ${entries} entries, more than the ${MAX_BAT_ENTRIES} tapkit accepts`);
  const batBytes = Math.ceil((entries * 4) / 512) * 512;
  base.batBytes = batBytes;
  const tableOffset = header.tableOffset;
  const batEnd = tableOffset + batBytes;
  if (tableOffset < FOOTER_SIZE || batEnd > footerOffset) {
    fatal('table offset', `the BAT (${batBytes} bytes at ${tableOffset}) does not lie between the footer copy and the footer at ${footerOffset}`);
  }
  if (tableOffset < headerOffset + HEADER_SIZE && headerOffset < batEnd) {
    fatal('table offset', `the BAT (${batBytes} bytes at ${tableOffset}) overlaps the dynamic header at ${headerOffset}`);
  }
  const batRaw = await readAt(lower, tableOffset, entries * 4);
  const bat = new Uint32Array(entries);
  for (let i = 0; i < entries; i++) bat[i] = batRaw.readUInt32BE(i * 4);
  base.bat = bat;

  // ---- metadata regions: footer copy, header, BAT, a blktap batmap, locator data.
  const regions: Array<[number, number, string]> = [
    [0, FOOTER_SIZE, 'the footer copy'],
    [headerOffset, headerOffset + HEADER_SIZE, 'the dynamic header'],
    [tableOffset, batEnd, 'the BAT'],
  ];
  let metaEnd = Math.max(headerOffset + HEADER_SIZE, batEnd);
  if (batEnd + 512 <= footerOffset) {
    const batmapHeader = await readAt(lower, batEnd, 512);
    if (batmapHeader.toString('latin1', 0, 8) === 'tdbatmap') {
      const mapOffset = Number(batmapHeader.readBigUInt64BE(8));
      const mapSectors = batmapHeader.readUInt32BE(16);
      if (Number.isSafeInteger(mapOffset) && mapOffset >= batEnd && mapOffset + mapSectors * 512 <= footerOffset) {
        base.batmap = { headerOffset: batEnd, mapOffset, mapSectors };
        regions.push([batEnd, batEnd + 512, 'the batmap header'], [mapOffset, mapOffset + mapSectors * 512, 'the batmap']);
        metaEnd = Math.max(metaEnd, batEnd + 512, mapOffset + mapSectors * 512);
      } else {
        note('batmap', `blktap batmap header at ${batEnd} points outside the file; ignored`);
        regions.push([batEnd, batEnd + 512, 'the batmap header']);
        metaEnd = Math.max(metaEnd, batEnd + 512);
      }
    }
  }
  if (footer.diskType === DiskType.Differencing) {
    for (const [i, l] of header.locators.entries()) {
      if (!l.code) continue;
      const end = l.dataOffset + Math.max(l.dataLength, 0);
      if (!Number.isSafeInteger(end) || l.dataOffset < FOOTER_SIZE || end > footerOffset) {
        note(`parent locator ${i}`, `parent locator ${i} (${l.code}) data (${l.dataLength} bytes at ${l.dataOffset}) lies outside the file`);
        continue;
      }
      regions.push([l.dataOffset, end, `parent locator ${i}`]);
      metaEnd = Math.max(metaEnd, Math.ceil(end / 512) * 512);
    }
  }

  // ---- every allocated block: after the metadata, before the footer, not overlapping another.
  const blocks: Array<[number, number, number]> = [];
  let dataEnd = metaEnd;
  for (let i = 0; i < entries; i++) {
    const entry = bat[i];
    if (entry === UNALLOCATED) continue;
    const start = entry * 512;
    // Only the part of the last block inside the disk must be present.
    const within = i < needed ? Math.min(blockSize, footer.currentSize - i * blockSize) : blockSize;
    const end = start + bitmapBytes + Math.ceil(within / 512) * 512;
    const hit = regions.find(([from, to]) => start < to && from < end);
    if (hit) {
      fail(`bat[${i}]`, `BAT entry ${i} (sector ${entry}) points inside the image's metadata (${hit[2]}, bytes ${hit[0]}-${hit[1]})`);
      continue;
    }
    if (end > footerOffset) {
      fail(`bat[${i}]`, `BAT entry ${i} (sector ${entry}) points past the end of the file: its block ends at ${end}, the footer is at ${footerOffset}`);
      continue;
    }
    blocks.push([start, start + bitmapBytes + blockSize, i]);
    dataEnd = Math.max(dataEnd, start + bitmapBytes + blockSize);
  }
  blocks.sort((a, b) => a[0] - b[0]);
  for (let k = 1; k < blocks.length; k++) {
    if (blocks[k][0] < blocks[k - 1][1]) {
      fail(`bat[${blocks[k][2]}]`, `BAT entries ${blocks[k - 1][2]} and ${blocks[k][2]} point to overlapping blocks (sectors ${blocks[k - 1][0] / 512} and ${blocks[k][0] / 512})`);
    }
  }
  base.dataEnd = Math.ceil(dataEnd / 512) * 512;
  return base;
}
