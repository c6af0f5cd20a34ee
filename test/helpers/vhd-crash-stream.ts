/**
 * The write stream of the VHD crash test, shared by the writer process (which runs it
 * until it is killed) and the test (which replays it to know what the disk may hold).
 * Deterministic from a seed: op i of seed s is the same in both processes.
 */
import { prng, randomBytesFrom } from './vhd';

/** Ops between two flushes, at most. */
export const MAX_UNFLUSHED = 24;

export interface CrashOp {
  kind: 'write' | 'zero';
  offset: number;
  length: number;
  /** Bytes written (write) or undefined (zero). */
  data?: Buffer;
  fua: boolean;
  /** A flush follows this op. */
  flushAfter: boolean;
}

export function* crashStream(seed: number, diskSize: number): Generator<CrashOp> {
  const next = prng(seed);
  let sinceFlush = 0;
  for (;;) {
    const long = next() < 0.1;
    const length = long ? Math.floor(next() * 1.5 * 2 ** 20) + 1 : Math.floor(next() * 40_000) + 1;
    const offset = Math.floor(next() * (diskSize - length));
    const kind = next() < 0.8 ? 'write' : 'zero';
    const fua = next() < 0.1;
    // At most MAX_UNFLUSHED ops between flushes (the test tracks them in a 32-bit mask).
    const flushAfter = next() < 0.2 || ++sinceFlush >= MAX_UNFLUSHED;
    if (flushAfter) sinceFlush = 0;
    yield { kind, offset, length, data: kind === 'write' ? randomBytesFrom(next, length) : undefined, fua, flushAfter };
  }
}

/** What a crash interrupted: ops 0..lastStart were issued, 0..lastFlushed are covered by a completed flush. */
export interface CrashPoint {
  lastStart: number;
  lastFlushed: number;
  /** FUA ops (after lastFlushed) that completed. */
  acked: Set<number>;
}

function apply(model: Buffer, op: CrashOp): void {
  if (op.kind === 'write') op.data!.copy(model, op.offset);
  else model.fill(0, op.offset, op.offset + op.length);
}

/**
 * The first byte of `actual` that the crash point does not allow, or -1; `before` is the
 * disk before the stream. Ops up to the last flush are certain, and so are acknowledged
 * FUA ops; for later ones each byte carries a mask of the sources it may come from
 * (bit 0: the flushed state, bit k: the k-th later op).
 */
export function firstDisallowedByte(before: Buffer, actual: Buffer, ops: CrashOp[], point: CrashPoint): number {
  const flushed = Buffer.from(before);
  for (let i = 0; i <= point.lastFlushed; i++) apply(flushed, ops[i]);
  const later = ops.slice(point.lastFlushed + 1, point.lastStart + 1);
  if (later.length > MAX_UNFLUSHED) throw new Error(`${later.length} unflushed ops: more than the stream makes`);
  const mask = new Uint32Array(actual.length);
  later.forEach((op, k) => {
    const acked = point.acked.has(point.lastFlushed + 1 + k);
    const bit = 1 << (k + 1);
    for (let b = op.offset; b < op.offset + op.length; b++) mask[b] = acked ? bit : (mask[b] || 1) | bit;
  });
  const valueOf = (b: number, source: number): number => {
    if (source === 0) return flushed[b];
    const op = later[source - 1];
    return op.kind === 'write' ? op.data![b - op.offset] : 0;
  };
  for (let b = 0; b < actual.length; b++) {
    const m = mask[b];
    if (m === 0) {
      if (actual[b] !== flushed[b]) return b;
      continue;
    }
    let ok = false;
    for (let s = 0; s < 32 && !ok; s++) if (m & (1 << s) && valueOf(b, s) === actual[b]) ok = true;
    if (!ok) return b;
  }
  return -1;
}
