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
