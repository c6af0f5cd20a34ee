/** Structure-aware mutations of a VHD: footer and header fields (checksums fixed or not), BAT entries, bitmaps, locators, parent names. */
import { applyBlind, hostileNames, pickValue, readUint, writeUint, type Mutation, type MutationContext } from './mutators';

/** [offset, width] of footer fields. */
const FOOTER_FIELDS: Array<[number, number]> = [[8, 4], [12, 4], [16, 8], [40, 8], [48, 8], [56, 4], [60, 4], [64, 4], [68, 8], [84, 1]];
/** [offset, width] of dynamic header fields. */
const HEADER_FIELDS: Array<[number, number]> = [[8, 8], [16, 8], [24, 4], [28, 4], [32, 4], [36, 4], [40, 8], [56, 4], [64, 8]];
const LOCATOR_FIELDS: Array<[number, number]> = [[0, 4], [4, 4], [8, 4], [16, 8]];
const CODES = ['W2ru', 'W2ku', 'MacX', 'Wi2r', 'Wi2k', 'Mac '];

function checksum(bytes: Buffer, start: number, length: number, at: number): void {
  if (start < 0 || start + length > bytes.length) return;
  let sum = 0;
  for (let i = start; i < start + length; i++) if (i < at || i >= at + 4) sum = (sum + bytes[i]) >>> 0;
  bytes.writeUInt32BE(~sum >>> 0, at);
}

interface Layout {
  footers: number[];
  header?: number;
}

function layout(bytes: Buffer): Layout {
  const footers: number[] = [];
  if (bytes.length >= 512 && bytes.toString('latin1', bytes.length - 512, bytes.length - 504) === 'conectix') footers.push(bytes.length - 512);
  if (bytes.length >= 1024 && bytes.toString('latin1', 0, 8) === 'conectix') footers.push(0);
  const from = footers[0] ?? 0;
  const dataOffset = readUint(bytes, from + 16, 8);
  const header = dataOffset < BigInt(bytes.length - 1024) && dataOffset > 0n ? Number(dataOffset) : undefined;
  return { footers, header };
}

export function mutateVhd(bytes: Buffer, m: Mutation, ctx: MutationContext): Buffer {
  const blind = applyBlind(bytes, m);
  if (blind) return blind;
  const { footers, header } = layout(bytes);
  const fixFooters = () => footers.forEach((f) => checksum(bytes, f, 512, f + 64));
  const fixHeader = () => header !== undefined && checksum(bytes, header, 1024, header + 36);
  switch (m.kind) {
    case 'field': {
      const all = [...FOOTER_FIELDS.map((f) => ['footer', f] as const), ...HEADER_FIELDS.map((f) => ['header', f] as const)];
      const [where, [offset, width]] = all[m.index % all.length];
      const bases = where === 'header' ? (header === undefined ? [] : [header]) : m.target === 2 ? footers : footers.slice(m.target, m.target + 1);
      for (const base of bases) writeUint(bytes, base + offset, width, pickValue(m.value, readUint(bytes, base + offset, width), width * 8, bytes.length, 512));
      if (m.fixChecksum) where === 'header' ? fixHeader() : fixFooters();
      return bytes;
    }
    case 'entry': {
      if (header === undefined) return bytes;
      const table = Number(readUint(bytes, header + 16, 8));
      const entries = Number(readUint(bytes, header + 28, 4));
      if (table + entries * 4 > bytes.length || entries === 0) return bytes;
      if (m.table % 2 === 0) {
        const at = table + (m.index % entries) * 4;
        writeUint(bytes, at, 4, pickValue(m.value, readUint(bytes, at, 4), 32, Math.floor(bytes.length / 512), 1));
      } else {
        // A byte of the first allocated block's sector bitmap.
        for (let i = 0; i < entries; i++) {
          const sector = Number(readUint(bytes, table + i * 4, 4));
          if (sector !== 0xffffffff && sector * 512 + 512 <= bytes.length) {
            bytes[sector * 512 + (m.index % 512)] = Number(m.value.raw & 0xffn);
            break;
          }
        }
      }
      return bytes;
    }
    case 'locator':
    case 'extension': {
      if (header === undefined) return bytes;
      const at = header + 576 + (m.index % 8) * 24;
      const [offset, width] = LOCATOR_FIELDS[m.kind === 'locator' ? m.field : 2];
      if (offset === 0) bytes.write(CODES[m.value.pick % CODES.length], at, 'latin1');
      else writeUint(bytes, at + offset, width, pickValue(m.value, readUint(bytes, at + offset, width), width * 8, bytes.length, 512));
      if (m.kind === 'extension' || m.fixChecksum) fixHeader();
      return bytes;
    }
    case 'name': {
      if (header === undefined) return bytes;
      const names = hostileNames(ctx);
      const name = names[m.name % names.length];
      for (let i = 0; i < 8; i++) {
        const at = header + 576 + i * 24;
        const code = bytes.toString('latin1', at, at + 4);
        const payload = code === 'MacX' ? Buffer.from(`file://${name}`, 'utf8') : code === 'W2ru' || code === 'W2ku' ? Buffer.from(name.replace(/\//g, '\\'), 'utf16le') : undefined;
        const dataOffset = Number(readUint(bytes, at + 16, 8));
        if (!payload || dataOffset + payload.length > bytes.length) continue;
        payload.copy(bytes, dataOffset);
        writeUint(bytes, at + 8, 4, BigInt(payload.length));
      }
      bytes.fill(0, header + 64, header + 576);
      Buffer.from(name, 'utf16le').swap16().subarray(0, 512).copy(bytes, header + 64);
      if (m.fixChecksum) fixHeader();
      return bytes;
    }
  }
  return bytes;
}
