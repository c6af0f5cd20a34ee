/**
 * Sector bitmaps: one bit per 512-byte sector of a block, most significant bit first
 * (sector k is bit 0x80 >> (k % 8) of byte k / 8). 1 = the block holds the sector;
 * 0 = never written (zeros in a dynamic disk, the parent's sector in a differencing one).
 * On disk the bitmap is padded to a whole number of sectors.
 */

/** Bytes the bitmap of a block occupies on disk (rounded up to 512). */
export function bitmapBytesFor(blockSize: number): number {
  const bits = blockSize / 512;
  return Math.ceil(Math.ceil(bits / 8) / 512) * 512;
}

export function testBit(map: Uint8Array, sector: number): boolean {
  return (map[sector >> 3] & (0x80 >> (sector & 7))) !== 0;
}

export function setBits(map: Uint8Array, first: number, count: number, value: boolean): void {
  for (let s = first; s < first + count; s++) {
    if (value) map[s >> 3] |= 0x80 >> (s & 7);
    else map[s >> 3] &= ~(0x80 >> (s & 7));
  }
}

/** Whether every sector in [first, first+count) has the given value. */
export function allBits(map: Uint8Array, first: number, count: number, value: boolean): boolean {
  return runLength(map, first, first + count) >= count && testBit(map, first) === value;
}

/** Number of sectors from `first` (exclusive `limit`) with the same bit as `first`. */
export function runLength(map: Uint8Array, first: number, limit: number): number {
  const value = testBit(map, first);
  let s = first + 1;
  while (s < limit) {
    // Skip whole bytes that agree, the common case for qemu's all-ones bitmaps.
    if ((s & 7) === 0 && s + 8 <= limit && map[s >> 3] === (value ? 0xff : 0)) {
      s += 8;
      continue;
    }
    if (testBit(map, s) !== value) break;
    s++;
  }
  return Math.min(s, limit) - first;
}

/** Runs of equal bits covering [first, first+count): [startSector, length, present]. */
export function bitRuns(map: Uint8Array, first: number, count: number): Array<[number, number, boolean]> {
  const runs: Array<[number, number, boolean]> = [];
  const end = first + count;
  let s = first;
  while (s < end) {
    const n = runLength(map, s, end);
    runs.push([s, n, testBit(map, s)]);
    s += n;
  }
  return runs;
}
