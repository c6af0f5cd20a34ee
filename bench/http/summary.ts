/**
 * Turns bench/http/run.sh's CSV (test,server,rep,metric,value) into the shared ratio
 * records, so `npm run bench` can put the HTTP ratios in its summary table.
 *
 *   node dist/bench/http/summary.js results.csv     (appends to $BENCH_SUMMARY, prints the table)
 */
import * as fs from 'node:fs';
import { pairedRatios, recordRatios, summaryTable, type RatioRecord } from '../lib';

const MINE = 'tapkit-http';
const PEER = 'nbdkit-curl';
const METRIC: Record<string, string> = { seqread: 'MiB/s', rr32: 'IOPS' };
const LABEL: Record<string, string> = { seqread: 'seqread (1M read QD8, MiB/s)', rr32: 'rr32 (4k randread QD32, IOPS)' };

export function httpRatios(csv: string): RatioRecord[] {
  const rows = fs.readFileSync(csv, 'utf8').trim().split('\n').slice(1).map((line) => line.split(','));
  const value = (test: string, server: string, rep: number, metric: string) =>
    rows.find((r) => r[0] === test && r[1] === server && Number(r[2]) === rep && r[3] === metric)?.[4];
  const reps = [...new Set(rows.map((r) => Number(r[2])))].sort((a, b) => a - b);
  const tests = [...new Set(rows.map((r) => r[0]))];
  return tests.map((test) => {
    const series = (server: string, metric: string) => reps.map((rep) => {
      const v = value(test, server, rep, metric);
      return v === undefined ? undefined : Number(v);
    });
    const foreign = [...series(MINE, 'foreign_cpu'), ...series(PEER, 'foreign_cpu')].filter((x): x is number => x !== undefined);
    return {
      bench: 'http',
      pair: `${MINE} / ${PEER}`,
      workload: LABEL[test] ?? test,
      ratios: pairedRatios(series(MINE, METRIC[test] ?? 'MiB/s'), series(PEER, METRIC[test] ?? 'MiB/s')),
      maxForeignPct: foreign.length ? Math.max(...foreign) : 0,
    };
  });
}

if (require.main === module) {
  const records = httpRatios(process.argv[2]);
  for (const r of records) recordRatios(r);
  process.stdout.write(`${summaryTable(records)}\n`);
}
