/**
 * The internal snapshot table: `nb_snapshots` variable-length entries at
 * `snapshots_offset`, each padded to 8 bytes. Read in bounded chunks; the whole table
 * may not exceed qemu's 64 MiB limit, and every entry must lie inside the file.
 */
import { CorruptImageError } from '../../core/errors';
import { MAX_L1_BYTES, MAX_SNAPSHOT_TABLE_BYTES } from './header';

export interface Snapshot {
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
  /** Creation time, seconds since the epoch. */
  date: number;
  vmStateSize: number;
  /** Disk size when the snapshot was taken (v3 extra data), else undefined. */
  diskSize?: number;
}

const FIXED = 40;
/** Extra data beyond what we know is skipped, but bounded. */
const MAX_EXTRA = 1024;

export type ReadAt = (offset: number, length: number) => Promise<Uint8Array>;

export async function readSnapshotTable(readAt: ReadAt, offset: number, count: number, fileSize: number): Promise<Snapshot[]> {
  const snapshots: Snapshot[] = [];
  let at = offset;
  const limit = Math.min(fileSize, offset + MAX_SNAPSHOT_TABLE_BYTES);
  const need = (bytes: number, what: string) => {
    if (at + bytes > limit) {
      const cause = at + bytes > fileSize ? `overruns the ${fileSize}-byte file` : `is larger than the ${MAX_SNAPSHOT_TABLE_BYTES / 1048576} MiB limit`;
      throw new CorruptImageError('snapshots_offset', `qcow2: snapshot table (${what} of entry ${snapshots.length}) ${cause}`);
    }
  };
  for (let i = 0; i < count; i++) {
    need(FIXED, 'header');
    const fixed = await readAt(at, FIXED);
    const view = new DataView(fixed.buffer, fixed.byteOffset, fixed.byteLength);
    const l1High = view.getUint32(0);
    const l1TableOffset = l1High * 2 ** 32 + view.getUint32(4);
    const l1Size = view.getUint32(8);
    const idLength = view.getUint16(12);
    const nameLength = view.getUint16(14);
    const date = view.getUint32(16);
    const vmStateSize = view.getUint32(32);
    const extraSize = view.getUint32(36);
    if (extraSize > MAX_EXTRA) throw new CorruptImageError('snapshot_extra_data_size', `qcow2: snapshot ${i} has ${extraSize} bytes of extra data (limit ${MAX_EXTRA})`);
    if (l1Size * 8 > MAX_L1_BYTES) throw new CorruptImageError('snapshot_l1_size', `qcow2: snapshot ${i} has an L1 table of ${l1Size} entries (limit ${MAX_L1_BYTES / 8})`);
    if (l1High > 0x00ffffff) throw new CorruptImageError('snapshot_l1_table_offset', `qcow2: snapshot ${i} L1 table offset is beyond 2^56`);
    const variable = extraSize + idLength + nameLength;
    need(FIXED + variable, 'body');
    const body = variable > 0 ? await readAt(at + FIXED, variable) : new Uint8Array(0);
    const bodyView = new DataView(body.buffer, body.byteOffset, body.byteLength);
    let diskSize: number | undefined;
    if (extraSize >= 16) {
      const big = bodyView.getBigUint64(8);
      if (big <= BigInt(Number.MAX_SAFE_INTEGER)) diskSize = Number(big);
    }
    const id = Buffer.from(body.subarray(extraSize, extraSize + idLength)).toString('utf8');
    const name = Buffer.from(body.subarray(extraSize + idLength, extraSize + idLength + nameLength)).toString('utf8');
    snapshots.push({ id, name, l1TableOffset, l1Size, date, vmStateSize, diskSize });
    at += Math.ceil((FIXED + variable) / 8) * 8;
  }
  return snapshots;
}
