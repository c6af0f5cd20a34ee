/**
 * The VHD checksum: the one's complement of the byte sum of a structure, with its own
 * four checksum bytes counted as zero. Used by the footer (512 bytes) and the dynamic
 * header (1024 bytes).
 */
export function vhdChecksum(bytes: Uint8Array, checksumOffset: number): number {
  let sum = 0;
  for (let i = 0; i < bytes.length; i++) {
    if (i >= checksumOffset && i < checksumOffset + 4) continue;
    sum = (sum + bytes[i]) >>> 0;
  }
  return ~sum >>> 0;
}
