/**
 * Splitting a byte range at fixed-size boundaries (a memory provider's chunks, a VHD's
 * blocks, any format's clusters): the one loop every such provider needs.
 */

/**
 * Calls `fn` once per piece of [offset, offset + length) that lies in one `pieceSize`
 * unit, in order: `index` is the unit's number, `within` the piece's offset inside the
 * unit, `length` its size, `done` how many bytes of the range came before it.
 */
export function forEachPiece(
  offset: number,
  length: number,
  pieceSize: number,
  fn: (index: number, within: number, length: number, done: number) => void,
): void {
  let done = 0;
  while (done < length) {
    const position = offset + done;
    const index = Math.floor(position / pieceSize);
    const within = position - index * pieceSize;
    const n = Math.min(pieceSize - within, length - done);
    fn(index, within, n, done);
    done += n;
  }
}
