/** Per-VBD counters and a latency histogram with power-of-two microsecond buckets. */

export const OPERATIONS = ['read', 'write', 'flush', 'trim', 'zero', 'extents', 'cache'] as const;
export type Operation = (typeof OPERATIONS)[number];

/** Bucket i counts latencies in [2^(i-1), 2^i) µs; bucket 0 is < 1 µs; the last is open-ended. */
const BUCKETS = 32;

export class LatencyHistogram {
  readonly counts = new Array<number>(BUCKETS).fill(0);
  total = 0;
  /** Sum of all recorded latencies in µs (for Prometheus' _sum). */
  sum = 0;

  record(micros: number): void {
    this.sum += micros;
    const bucket = micros < 1 ? 0 : Math.min(BUCKETS - 1, Math.floor(Math.log2(micros)) + 1);
    this.counts[bucket]++;
    this.total++;
  }

  /** Upper bound (µs) of the bucket holding the p-th percentile (0 < p ≤ 100), or 0 when empty. */
  /** Upper bound in µs of bucket i (Infinity for the last). */
  static bound(i: number): number {
    return i === BUCKETS - 1 ? Infinity : 2 ** i;
  }

  percentile(p: number): number {
    if (this.total === 0) return 0;
    const rank = Math.ceil((p / 100) * this.total);
    let seen = 0;
    for (let i = 0; i < BUCKETS; i++) {
      seen += this.counts[i];
      if (seen >= rank) return 2 ** i;
    }
    return 2 ** (BUCKETS - 1);
  }
}

export interface OperationStats {
  count: number;
  bytes: number;
  errors: number;
  latency: { p50: number; p90: number; p99: number; max: number };
}

export interface VbdStatsSnapshot {
  operations: Record<Operation, OperationStats>;
  inFlight: number;
  queued: number;
  paused: boolean;
}

export class VbdStats {
  private readonly perOp = new Map<Operation, { count: number; bytes: number; errors: number; histogram: LatencyHistogram; max: number }>();

  constructor() {
    for (const op of OPERATIONS) this.perOp.set(op, { count: 0, bytes: 0, errors: 0, histogram: new LatencyHistogram(), max: 0 });
  }

  record(op: Operation, bytes: number, micros: number, failed: boolean): void {
    const entry = this.perOp.get(op)!;
    entry.count++;
    if (failed) entry.errors++;
    else entry.bytes += bytes;
    entry.histogram.record(micros);
    if (micros > entry.max) entry.max = micros;
  }

  histogram(op: Operation): LatencyHistogram {
    return this.perOp.get(op)!.histogram;
  }

  snapshot(inFlight: number, queued: number, paused: boolean): VbdStatsSnapshot {
    const operations = {} as Record<Operation, OperationStats>;
    for (const [op, e] of this.perOp) {
      operations[op] = {
        count: e.count,
        bytes: e.bytes,
        errors: e.errors,
        latency: { p50: e.histogram.percentile(50), p90: e.histogram.percentile(90), p99: e.histogram.percentile(99), max: Math.round(e.max) },
      };
    }
    return { operations, inFlight, queued, paused };
  }
}
