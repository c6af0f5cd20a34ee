/**
 * Copies one VBD onto another, skipping what reads as zeros: holes and zero extents are
 * never read, and data chunks that turn out all-zero are not written. Onto a fresh
 * sparse target that keeps the copy sparse; onto a target that may hold old data
 * (`targetIsZero: false`) the skipped ranges are zeroed instead.
 */
import type { Vbd } from './vbd';

export interface CopyOptions {
  /** The target already reads as zeros everywhere (a freshly truncated file). */
  targetIsZero: boolean;
  /** Bytes per read/write (default 1 MiB). */
  chunkSize?: number;
  /** Reads in flight at once (default 4). */
  parallel?: number;
  onProgress?: (copied: number, total: number) => void;
}

/** How much of the disk one extents query covers. */
const EXTENTS_WINDOW = 1 << 30;

export async function copyVbd(source: Vbd, target: Vbd, options: CopyOptions): Promise<{ dataBytes: number }> {
  const size = source.info().size;
  const chunkSize = options.chunkSize ?? 1 << 20;
  const zeros = Buffer.alloc(chunkSize);
  let dataBytes = 0;
  let progressed = 0;
  const report = (n: number) => {
    progressed += n;
    options.onProgress?.(progressed, size);
  };

  const pieces: Array<{ offset: number; length: number; data: boolean }> = [];
  const work = async (piece: { offset: number; length: number; data: boolean }, buf: Buffer) => {
    if (piece.data) {
      const view = buf.subarray(0, piece.length);
      await source.read(view, piece.offset);
      const allZero = view.equals(zeros.subarray(0, piece.length));
      if (!allZero) {
        await target.write(view, piece.offset);
        dataBytes += piece.length;
      } else if (!options.targetIsZero) {
        await target.zero(piece.offset, piece.length, { mayTrim: true });
      }
    } else if (!options.targetIsZero) {
      await target.zero(piece.offset, piece.length, { mayTrim: true });
    }
    report(piece.length);
  };

  const parallel = Math.max(1, options.parallel ?? 4);
  const buffers = Array.from({ length: parallel }, () => Buffer.allocUnsafe(chunkSize));
  for (let windowStart = 0; windowStart < size; ) {
    const windowLength = Math.min(EXTENTS_WINDOW, size - windowStart);
    const runs = await source.extents(windowStart, windowLength);
    pieces.length = 0;
    for (const run of runs) {
      const data = run.type === 'data';
      // Holes go in one piece; data is cut into chunk-sized reads.
      const step = data ? chunkSize : run.length;
      for (let o = run.offset; o < run.offset + run.length; o += step) {
        pieces.push({ offset: o, length: Math.min(step, run.offset + run.length - o), data });
      }
    }
    let next = 0;
    await Promise.all(
      buffers.map(async (buf) => {
        while (next < pieces.length) await work(pieces[next++], buf);
      }),
    );
    const covered = runs.reduce((end, r) => Math.max(end, r.offset + r.length), windowStart);
    windowStart = covered;
  }
  await target.flush();
  return { dataBytes };
}
