/**
 * qcow2 header extensions: `{type u32, length u32, data, padding to 8}` records from the
 * end of the header up to the backing file name (or the end of the first cluster),
 * ended by type 0. A record that runs past that area is corruption, not a short read.
 */
import { CorruptImageError } from '../../core/errors';

export const EXT = {
  end: 0x00000000,
  backingFormat: 0xe2792aca,
  featureNames: 0x6803f857,
  bitmaps: 0x23852875,
  cryptoHeader: 0x0537be77,
  dataFile: 0x44415441,
} as const;

/** qemu keeps the backing format in a 16-byte buffer, NUL included. */
export const MAX_BACKING_FORMAT = 15;
/** A data file name longer than a path can be is not a name. */
export const MAX_DATA_FILE_NAME = 4096;

export interface FeatureNames {
  incompatible: Map<number, string>;
  compatible: Map<number, string>;
  autoclear: Map<number, string>;
}

export interface Extensions {
  backingFormat?: string;
  dataFile?: string;
  featureNames: FeatureNames;
  /** Number of persistent dirty bitmaps (informational). */
  bitmaps?: number;
  hasCryptoHeader: boolean;
  /** Types we do not know, for `describe()`. */
  unknown: number[];
}

/**
 * Parses the extension area. `area` is the file from offset 0 up to where the area ends;
 * extensions start at `start` (the header length).
 */
export function parseExtensions(area: Uint8Array, start: number): Extensions {
  const view = new DataView(area.buffer, area.byteOffset, area.byteLength);
  const result: Extensions = {
    featureNames: { incompatible: new Map(), compatible: new Map(), autoclear: new Map() },
    hasCryptoHeader: false,
    unknown: [],
  };
  let at = start;
  while (at < area.length) {
    if (at + 8 > area.length) throw new CorruptImageError('header_extension', `qcow2: header extension at offset ${at} overruns the extension area (ends at ${area.length})`);
    const type = view.getUint32(at);
    const length = view.getUint32(at + 4);
    if (type === EXT.end) return result;
    const dataStart = at + 8;
    if (length > area.length - dataStart) {
      throw new CorruptImageError('header_extension', `qcow2: header extension 0x${type.toString(16).padStart(8, '0')} at offset ${at} of ${length} bytes overruns the extension area (ends at ${area.length})`);
    }
    const data = area.subarray(dataStart, dataStart + length);
    switch (type) {
      case EXT.backingFormat:
        if (length > MAX_BACKING_FORMAT) throw new CorruptImageError('backing_format', `qcow2: backing format name of ${length} bytes is too long (at most ${MAX_BACKING_FORMAT})`);
        result.backingFormat = text(data);
        break;
      case EXT.dataFile:
        if (length > MAX_DATA_FILE_NAME) throw new CorruptImageError('data_file', `qcow2: data file name of ${length} bytes is too long`);
        result.dataFile = text(data);
        break;
      case EXT.featureNames:
        readFeatureNames(data, result.featureNames);
        break;
      case EXT.bitmaps:
        if (length >= 4) result.bitmaps = new DataView(data.buffer, data.byteOffset, data.byteLength).getUint32(0);
        break;
      case EXT.cryptoHeader:
        result.hasCryptoHeader = true;
        break;
      default:
        result.unknown.push(type);
    }
    at = dataStart + Math.ceil(length / 8) * 8;
  }
  // The area ended without an end marker: tolerated, as qemu does when the area is exactly full.
  return result;
}

/** Strings are not NUL-terminated, but padding may look like a terminator. */
function text(data: Uint8Array): string {
  const nul = data.indexOf(0);
  return Buffer.from(nul < 0 ? data : data.subarray(0, nul)).toString('utf8');
}

function readFeatureNames(data: Uint8Array, into: FeatureNames): void {
  for (let at = 0; at + 48 <= data.length; at += 48) {
    const kind = data[at];
    const bit = data[at + 1];
    const name = text(data.subarray(at + 2, at + 48));
    if (kind === 0) into.incompatible.set(bit, name);
    else if (kind === 1) into.compatible.set(bit, name);
    else if (kind === 2) into.autoclear.set(bit, name);
  }
}
