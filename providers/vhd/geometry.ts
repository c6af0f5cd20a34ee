/**
 * CHS geometry as the VHD specification's appendix computes it from a disk size, and
 * the format's size limit. Virtual PC exposed C×H×S×512 bytes to its guests; we store
 * the geometry for those readers but the disk's size is always the footer's current size.
 */

export interface Geometry {
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
}

/** The largest disk the format allows: 2040 GiB (0xFF000000 sectors, qemu's and Hyper-V's limit). */
export const VHD_MAX_SIZE = 0xff000000 * 512;

/** The spec's rule; the result usually covers a little less than `size` (it rounds down). */
export function geometryFor(size: number): Geometry {
  let total = Math.floor(size / 512);
  if (total > 65535 * 16 * 255) total = 65535 * 16 * 255;
  let spt: number;
  let heads: number;
  let cth: number;
  if (total >= 65535 * 16 * 63) {
    spt = 255;
    heads = 16;
    cth = Math.floor(total / spt);
  } else {
    spt = 17;
    cth = Math.floor(total / spt);
    heads = Math.max(4, Math.floor((cth + 1023) / 1024));
    if (cth >= heads * 1024 || heads > 16) {
      spt = 31;
      heads = 16;
      cth = Math.floor(total / spt);
    }
    if (cth >= heads * 1024) {
      spt = 63;
      heads = 16;
      cth = Math.floor(total / spt);
    }
  }
  return { cylinders: Math.floor(cth / heads), heads, sectorsPerTrack: spt };
}

export function geometryBytes(g: Geometry): number {
  return g.cylinders * g.heads * g.sectorsPerTrack * 512;
}
