/**
 * The qcow2 header (versions 2 and 3) and the checks that decide whether an image is
 * read at all. Everything here works on the image's first cluster, already in memory.
 *
 * Every value that later drives an allocation (L1 size, snapshot table, extension
 * lengths, the backing name) is bounded here, so a hostile header fails with a limit
 * error instead of asking for gigabytes.
 */
import { BlockError, CorruptImageError } from '../../core/errors';
import { parseExtensions, type Extensions } from './extensions';

export const QCOW2_MAGIC = 0x514649fb; // 'QFI\xfb'

export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;

export const MIN_CLUSTER_BITS = 9; // 512 B
export const MAX_CLUSTER_BITS = 21; // 2 MiB
/** Extended L2 entries need 32 subclusters of at least 512 bytes. */
export const MIN_EXTENDED_L2_CLUSTER_BITS = 14;

/** qemu's own limits, which every qemu-made image respects. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_BACKING_NAME = 1023;
export const MAX_SNAPSHOTS = 65536;
export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;
export const MAX_REFCOUNT_ORDER = 6;

/** Incompatible feature bits (header offset 72). */
export const INCOMPAT = {
  dirty: 0,
  corrupt: 1,
  externalDataFile: 2,
  compressionType: 3,
  extendedL2: 4,
} as const;
const KNOWN_INCOMPAT_MASK = 0b11111n;

/** Compatible feature bits (offset 80). */
export const COMPAT_LAZY_REFCOUNTS = 0;
/** Autoclear feature bits (offset 88). */
export const AUTOCLEAR = { bitmaps: 0, rawExternalData: 1 } as const;

export type CompressionType = 'zlib' | 'zstd';

export interface Qcow2Header {
  version: 2 | 3;
  clusterBits: number;
  clusterSize: number;
  /** Virtual disk size in bytes. */
  size: number;
  backingFileOffset: number;
  backingFileSize: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: CompressionType;
  /** The backing file name as stored, or undefined. */
  backingFile?: string;
  extensions: Extensions;
}

export function hasBit(features: bigint, bit: number): boolean {
  return ((features >> BigInt(bit)) & 1n) === 1n;
}

/** True when the first bytes carry the qcow2 magic (any version: the version is checked at open). */
export function looksLikeQcow2(head: Uint8Array): boolean {
  return head.length >= 4 && head[0] === 0x51 && head[1] === 0x46 && head[2] === 0x49 && head[3] === 0xfb;
}

/** Reads a big-endian u64 that must fit in a Number (offsets, sizes). */
function u64(view: DataView, at: number, field: string): number {
  const value = view.getBigUint64(at);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw new CorruptImageError(field, `qcow2: header field ${field} (${value}) is beyond 2^53`);
  return Number(value);
}

/**
 * Parses and validates the header. `first` holds the start of the file: at least the
 * whole first cluster, or the whole file when it is shorter. `fileSize` is the image
 * file's size, against which table offsets are checked.
 */
export function parseHeader(first: Uint8Array, fileSize: number): Qcow2Header {
  if (first.length < V2_HEADER_LENGTH) {
    throw new CorruptImageError('header', `qcow2: file is ${first.length} bytes, shorter than a qcow2 header (${V2_HEADER_LENGTH})`);
  }
  const view = new DataView(first.buffer, first.byteOffset, first.byteLength);
  if (view.getUint32(0) !== QCOW2_MAGIC) throw new CorruptImageError('magic', `qcow2: no QFI\\xfb magic`);
  const version = view.getUint32(4);
  if (version === 1) throw new BlockError('EOPNOTSUPP', 'qcow2: version 1 (the old QCOW format) is not supported');
  if (version !== 2 && version !== 3) throw new BlockError('EOPNOTSUPP', `qcow2: unsupported version ${version} (supported: 2, 3)`);

  const clusterBits = view.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new CorruptImageError('cluster_bits', `qcow2: cluster_bits ${clusterBits} is out of range (${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}, 512 B to 2 MiB)`);
  }
  const clusterSize = 2 ** clusterBits;

  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  let headerLength = V2_HEADER_LENGTH;
  if (version === 3) {
    if (first.length < V3_MIN_HEADER_LENGTH) {
      throw new CorruptImageError('header_length', `qcow2: file is ${first.length} bytes, shorter than a version 3 header (${V3_MIN_HEADER_LENGTH})`);
    }
    incompatibleFeatures = view.getBigUint64(72);
    compatibleFeatures = view.getBigUint64(80);
    autoclearFeatures = view.getBigUint64(88);
    refcountOrder = view.getUint32(96);
    headerLength = view.getUint32(100);
    if (headerLength < V3_MIN_HEADER_LENGTH || headerLength % 8 !== 0 || headerLength > clusterSize) {
      throw new CorruptImageError('header_length', `qcow2: header_length ${headerLength} is invalid (a multiple of 8 from ${V3_MIN_HEADER_LENGTH} to the cluster size ${clusterSize})`);
    }
    if (headerLength > first.length) {
      throw new CorruptImageError('header_length', `qcow2: header_length ${headerLength} overruns the ${first.length}-byte file`);
    }
  }
  if (refcountOrder > MAX_REFCOUNT_ORDER) {
    throw new CorruptImageError('refcount_order', `qcow2: refcount_order ${refcountOrder} is out of range (0..${MAX_REFCOUNT_ORDER})`);
  }

  checkIncompatibleFeatures(incompatibleFeatures, first, headerLength, clusterSize);

  const cryptMethod = view.getUint32(32);
  if (cryptMethod === 1) throw new BlockError('EOPNOTSUPP', 'qcow2: encrypted image (legacy AES-CBC) is not supported');
  if (cryptMethod === 2) throw new BlockError('EOPNOTSUPP', 'qcow2: encrypted image (LUKS) is not supported');
  if (cryptMethod !== 0) throw new CorruptImageError('crypt_method', `qcow2: unknown encryption method ${cryptMethod}`);

  let compressionType: CompressionType = 'zlib';
  const typeByte = headerLength > 104 ? first[104] : 0;
  const typeBit = hasBit(incompatibleFeatures, INCOMPAT.compressionType);
  if (typeByte !== 0 && !typeBit) throw new CorruptImageError('compression_type', `qcow2: compression_type ${typeByte} without the compression-type feature bit`);
  if (typeBit && typeByte === 0) throw new CorruptImageError('compression_type', 'qcow2: compression-type feature bit set with compression_type zlib');
  if (typeByte === 1) compressionType = 'zstd';
  else if (typeByte !== 0) throw new BlockError('EOPNOTSUPP', `qcow2: unknown compression_type ${typeByte} (supported: 0 zlib, 1 zstd)`);

  const extendedL2 = hasBit(incompatibleFeatures, INCOMPAT.extendedL2);
  if (extendedL2 && clusterBits < MIN_EXTENDED_L2_CLUSTER_BITS) {
    throw new CorruptImageError('cluster_bits', `qcow2: extended L2 entries need clusters of at least 16 KiB (cluster_bits ${clusterBits})`);
  }

  const size = u64(view, 24, 'size');
  const backingFileOffset = u64(view, 8, 'backing_file_offset');
  const backingFileSize = view.getUint32(16);
  const l1Size = view.getUint32(36);
  const l1TableOffset = u64(view, 40, 'l1_table_offset');
  const refcountTableOffset = u64(view, 48, 'refcount_table_offset');
  const refcountTableClusters = view.getUint32(56);
  const nbSnapshots = view.getUint32(60);
  const snapshotsOffset = u64(view, 64, 'snapshots_offset');

  // The L1 table: bounded, aligned, inside the file, large enough for the disk.
  if (l1Size * 8 > MAX_L1_BYTES) {
    throw new CorruptImageError('l1_size', `qcow2: L1 table of ${l1Size} entries is larger than the ${MAX_L1_BYTES / 1048576} MiB limit`);
  }
  checkL1Fits(l1Size, size, clusterBits, extendedL2, 'l1_size');
  checkTable('l1_table_offset', l1TableOffset, l1Size * 8, clusterSize, fileSize);

  if (refcountTableClusters === 0) throw new CorruptImageError('refcount_table_clusters', 'qcow2: refcount table has no clusters');
  checkTable('refcount_table_offset', refcountTableOffset, refcountTableClusters * clusterSize, clusterSize, fileSize);

  if (nbSnapshots > MAX_SNAPSHOTS) throw new CorruptImageError('nb_snapshots', `qcow2: ${nbSnapshots} snapshots is more than the limit of ${MAX_SNAPSHOTS}`);
  if (nbSnapshots > 0) checkTable('snapshots_offset', snapshotsOffset, 40 * nbSnapshots, clusterSize, fileSize);

  // The backing file name lives in the first cluster, after the extensions.
  let backingFile: string | undefined;
  if (backingFileOffset !== 0) {
    if (backingFileSize > MAX_BACKING_NAME) throw new CorruptImageError('backing_file_size', `qcow2: backing file name of ${backingFileSize} bytes is longer than ${MAX_BACKING_NAME}`);
    if (backingFileOffset < headerLength || backingFileOffset + backingFileSize > clusterSize) {
      throw new CorruptImageError('backing_file_offset', `qcow2: backing file name (offset ${backingFileOffset}, ${backingFileSize} bytes) is outside the first cluster after the header`);
    }
    if (backingFileOffset + backingFileSize > first.length) {
      throw new CorruptImageError('backing_file_offset', `qcow2: backing file name (offset ${backingFileOffset}, ${backingFileSize} bytes) overruns the file`);
    }
    if (backingFileSize === 0) throw new CorruptImageError('backing_file_size', 'qcow2: empty backing file name');
    backingFile = Buffer.from(first.subarray(backingFileOffset, backingFileOffset + backingFileSize)).toString('utf8');
  }

  const extensionsEnd = Math.min(backingFileOffset !== 0 ? backingFileOffset : clusterSize, first.length);
  const extensions = parseExtensions(first.subarray(0, extensionsEnd), headerLength);

  return {
    version,
    clusterBits,
    clusterSize,
    size,
    backingFileOffset,
    backingFileSize,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    backingFile,
    extensions,
  };
}

/** Refuses unknown incompatible bits (named from the feature table when it has them) and the corrupt bit. */
function checkIncompatibleFeatures(features: bigint, first: Uint8Array, headerLength: number, clusterSize: number): void {
  const unknown = features & ~KNOWN_INCOMPAT_MASK;
  if (unknown !== 0n) {
    let names: Map<number, string> = new Map();
    try {
      // Best effort: the feature name table may say what the bits are called.
      names = parseExtensions(first.subarray(0, Math.min(clusterSize, first.length)), headerLength).featureNames.incompatible;
    } catch {
      // A damaged table does not change the verdict.
    }
    const bits: string[] = [];
    for (let bit = 5; bit < 64; bit++) {
      if (hasBit(unknown, bit)) bits.push(names.has(bit) ? `${bit} (${names.get(bit)})` : String(bit));
    }
    throw new BlockError('EOPNOTSUPP', `qcow2: unknown incompatible feature bit${bits.length > 1 ? 's' : ''} ${bits.join(', ')}: the image needs a newer reader`);
  }
  if (hasBit(features, INCOMPAT.corrupt)) {
    throw new CorruptImageError('incompatible_features', 'qcow2: the image is marked corrupt (incompatible feature bit 1); repair it with qemu-img check -r all');
  }
}

/** The L1 table must cover every cluster of `size`. */
export function checkL1Fits(l1Size: number, size: number, clusterBits: number, extendedL2: boolean, field: string): void {
  const l2Entries = 2 ** clusterBits / (extendedL2 ? 16 : 8);
  const needed = Math.ceil(Math.ceil(size / 2 ** clusterBits) / l2Entries);
  if (l1Size < needed) throw new CorruptImageError(field, `qcow2: L1 table of ${l1Size} entries is too small for a ${size}-byte disk (needs ${needed})`);
}

/** A metadata table: cluster aligned and entirely inside the file. */
export function checkTable(field: string, offset: number, bytes: number, clusterSize: number, fileSize: number): void {
  if (offset % clusterSize !== 0) throw new CorruptImageError(field, `qcow2: ${field} ${offset} is not aligned to the ${clusterSize}-byte cluster`);
  if (bytes > 0 && (offset === 0 || offset + bytes > fileSize)) {
    throw new CorruptImageError(field, `qcow2: ${field} ${offset} (${bytes} bytes) lies outside the ${fileSize}-byte file`);
  }
}
