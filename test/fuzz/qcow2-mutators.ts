/** Structure-aware mutations of a qcow2 image: header fields, L1/L2/refcount entries, extension lengths, backing names. */
import { applyBlind, hostileNames, pickValue, readUint, writeUint, type Mutation, type MutationContext } from './mutators';

/** [offset, width] of every header field. */
const FIELDS: Array<[number, number]> = [
  [4, 4], [8, 8], [16, 4], [20, 4], [24, 8], [32, 4], [36, 4], [40, 8], [48, 8], [56, 4], [60, 4], [64, 8], [72, 8], [80, 8], [88, 8], [96, 4], [100, 4], [104, 1],
];

function clusterOf(bytes: Buffer): number {
  const bits = Number(readUint(bytes, 20, 4));
  return bits >= 9 && bits <= 21 ? 2 ** bits : 65536;
}

const OFFSET_MASK = 0x00fffffffffffe00n;

/** The tables whose 8-byte entries can be mutated: L1, the first L2, the refcount table, the first refcount block. */
function tables(bytes: Buffer): Array<{ at: number; entries: number; width: number }> {
  const cluster = clusterOf(bytes);
  const out: Array<{ at: number; entries: number; width: number }> = [];
  const inside = (at: number, length: number) => at > 0 && at + length <= bytes.length;
  const l1At = Number(readUint(bytes, 40, 8));
  const l1Size = Number(readUint(bytes, 36, 4));
  if (inside(l1At, l1Size * 8) && l1Size > 0) {
    out.push({ at: l1At, entries: l1Size, width: 8 });
    for (let i = 0; i < l1Size; i++) {
      const l2 = Number(readUint(bytes, l1At + i * 8, 8) & OFFSET_MASK);
      if (inside(l2, cluster)) {
        out.push({ at: l2, entries: cluster / 8, width: 8 });
        break;
      }
    }
  }
  const refAt = Number(readUint(bytes, 48, 8));
  if (inside(refAt, cluster)) {
    out.push({ at: refAt, entries: cluster / 8, width: 8 });
    const block = Number(readUint(bytes, refAt, 8) & OFFSET_MASK);
    if (inside(block, cluster)) out.push({ at: block, entries: cluster / 8, width: 8 });
  }
  return out;
}

/** Offsets of the header extension records (their type word). */
function extensions(bytes: Buffer): number[] {
  const version = Number(readUint(bytes, 4, 4));
  let at = version >= 3 ? Number(readUint(bytes, 100, 4)) : 72;
  const end = Math.min(bytes.length, clusterOf(bytes));
  const out: number[] = [];
  while (at + 8 <= end && out.length < 64) {
    const type = readUint(bytes, at, 4);
    if (type === 0n) break;
    out.push(at);
    at += 8 + Math.ceil(Number(readUint(bytes, at + 4, 4)) / 8) * 8;
  }
  return out;
}

export function mutateQcow2(bytes: Buffer, m: Mutation, ctx: MutationContext): Buffer {
  const blind = applyBlind(bytes, m);
  if (blind) return blind;
  const cluster = clusterOf(bytes);
  switch (m.kind) {
    case 'field': {
      const [at, width] = FIELDS[m.index % FIELDS.length];
      writeUint(bytes, at, width, pickValue(m.value, readUint(bytes, at, width), width * 8, bytes.length, cluster));
      return bytes;
    }
    case 'entry': {
      const all = tables(bytes);
      if (all.length === 0) return bytes;
      const table = all[m.table % all.length];
      const at = table.at + (m.index % table.entries) * table.width;
      writeUint(bytes, at, table.width, pickValue(m.value, readUint(bytes, at, table.width), 64, bytes.length, cluster));
      return bytes;
    }
    case 'extension':
    case 'locator': {
      const all = extensions(bytes);
      if (all.length === 0) return bytes;
      const at = all[m.index % all.length];
      writeUint(bytes, at + 4, 4, pickValue(m.value, readUint(bytes, at + 4, 4), 32, bytes.length, 8));
      return bytes;
    }
    case 'name': {
      const name = Buffer.from(hostileNames(ctx)[m.name % hostileNames(ctx).length]);
      let at = Number(readUint(bytes, 8, 8));
      if (at === 0 || at + name.length > Math.min(cluster, bytes.length)) at = Math.max(0, Math.min(cluster, bytes.length) - name.length - 8);
      name.copy(bytes, at);
      writeUint(bytes, 8, 8, BigInt(at));
      writeUint(bytes, 16, 4, BigInt(name.length));
      return bytes;
    }
  }
  return bytes;
}
