/**
 * The shared summary: each bench records its paired ratios here; `npm run bench` (bench/run.ts)
 * collects them from every bench it ran into one table. A bench run on its own prints its
 * own tables as before; when BENCH_SUMMARY names a file, its ratios are also appended there
 * as JSON lines.
 */
import * as fs from 'node:fs';
import { NOISY_FOREIGN_PCT } from './cpu';
import { median } from './stats';
import { markdownTable } from './table';

export interface RatioRecord {
  /** Which bench: nbd, fuse, http, qcow2, vhd, xen. */
  bench: string;
  /** What was compared, e.g. "tapkit-memory / nbdkit-memory". */
  pair: string;
  /** The workload, e.g. "rr32 (4k randread QD32, IOPS)". */
  workload: string;
  /** Paired ratios, one per round (mine ÷ peer of speed: above 1 = tapkit faster). */
  ratios: number[];
  /** Highest foreign CPU (% of one CPU) seen in any measurement behind these ratios. */
  maxForeignPct: number;
  /** The bench's own target, e.g. ">= 0.8", if it has one. */
  target?: string;
}

export function recordRatios(record: RatioRecord): void {
  const file = process.env.BENCH_SUMMARY;
  if (file) fs.appendFileSync(file, `${JSON.stringify(record)}\n`);
}

export function readRatios(file: string): RatioRecord[] {
  if (!fs.existsSync(file)) return [];
  return fs.readFileSync(file, 'utf8').split('\n').filter(Boolean).map((line) => JSON.parse(line) as RatioRecord);
}

/**
 * Why a cell's ratio should not be trusted: a neighbour used much CPU during it, the rounds
 * disagree by more than 25 % of the median, or there was only one round.
 */
export function noiseFlags(r: RatioRecord): string[] {
  const flags: string[] = [];
  if (r.maxForeignPct > NOISY_FOREIGN_PCT) flags.push(`busy ${r.maxForeignPct.toFixed(0)}%`);
  if (r.ratios.length < 2) flags.push('1 round');
  else {
    const spread = (Math.max(...r.ratios) - Math.min(...r.ratios)) / median(r.ratios);
    if (spread > 0.25) flags.push(`spread ${(spread * 100).toFixed(0)}%`);
  }
  return flags;
}

export function summaryTable(records: RatioRecord[]): string {
  const rows = records.map((r) => {
    const flags = noiseFlags(r);
    const ratio = r.ratios.length
      ? `**${median(r.ratios).toFixed(2)}** [${Math.min(...r.ratios).toFixed(2)}–${Math.max(...r.ratios).toFixed(2)}]`
      : '–';
    return [r.bench, r.workload, r.pair, ratio, String(r.ratios.length), r.target ?? '', flags.length ? `⚠ ${flags.join(', ')}` : 'ok'];
  });
  return markdownTable(['bench', 'workload', 'A / B (tapkit first)', 'paired ratio median [min–max]', 'rounds', 'target', 'noise'], rows);
}
