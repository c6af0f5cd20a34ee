/**
 * The one entry point: runs the benches one after another, each in its own process (so each
 * cleans up after itself and none shares the runner's event loop), then prints one table of
 * every paired ratio they recorded, with its range and a flag where the cell was noisy.
 *
 *   npm run bench                  all benches
 *   npm run bench -- nbd fuse      some of them
 *   BENCH_QUICK=1 npm run bench    short settings for a smoke run (numbers not worth quoting)
 *
 * Each bench keeps its own knobs (see bench/README.md); ROUNDS/RUNTIME/PIN/QUIET_* set in the
 * environment reach all of them (bench/http still reads REPS, the old name of ROUNDS).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { placement, readRatios, summaryTable } from './lib';

const BENCHES: Record<string, { what: string; command: (out: string) => string[] }> = {
  nbd: { what: 'tapkit serve vs nbdkit and qemu-nbd (fio nbd engine)', command: () => [process.execPath, path.join(__dirname, 'nbd/run.js')] },
  fuse: { what: 'FUSE export + loop vs nbdkit + nbdfuse + loop (fio on the loop device)', command: () => [process.execPath, path.join(__dirname, 'fuse/run.js')] },
  http: { what: 'tapkit serve http:// vs nbdkit curl, both over nginx (fio nbd engine)', command: () => [process.execPath, path.join(__dirname, 'http/run.js')] },
  qcow2: { what: 'convert and serve of a half-compressed qcow2 vs qemu-img / qemu-nbd', command: () => [process.execPath, path.join(__dirname, 'qcow2/run.js')] },
  vhd: { what: 'serve of a dynamic VHD vs qemu-nbd -f vpc', command: () => [process.execPath, path.join(__dirname, 'vhd/run.js')] },
  xen: { what: 'blkif sim ring (C frontend) vs tapkit NBD export', command: () => [process.execPath, path.join(__dirname, 'xen/run.js')] },
};

/** Short settings for a smoke run; anything already in the environment wins. */
// REPS only for bench/http, which has not moved to ROUNDS yet (the same value, so no bench warns).
const QUICK: Record<string, string> = { REPS: '2', ROUNDS: '2', RUNTIME: '2', QUIET_WAIT: '3', QUIET_BUDGET: '30', SIZE_MIB: '256', COUNT_4K: '20000', COUNT_1M: '400' };

function main(): number {
  const wanted = process.argv.slice(2);
  const unknown = wanted.filter((b) => !(b in BENCHES));
  if (unknown.length) {
    process.stderr.write(`unknown bench ${unknown.join(', ')}; known: ${Object.keys(BENCHES).join(' ')}\n`);
    return 2;
  }
  const names = wanted.length ? wanted : Object.keys(BENCHES);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-bench-'));
  const summary = path.join(dir, 'ratios.jsonl');
  const env: NodeJS.ProcessEnv = { ...process.env, BENCH_SUMMARY: summary };
  if (process.env.BENCH_QUICK === '1') for (const [k, v] of Object.entries(QUICK)) env[k] ??= v;
  const started = new Date();
  const failed: string[] = [];
  process.stdout.write(`tapkit benches: ${names.join(' ')}; ${os.cpus().length} × ${os.cpus()[0]?.model ?? 'CPU'}, node ${process.version}, ${placement().describe()}${process.env.BENCH_QUICK === '1' ? ', QUICK settings' : ''}\n`);
  for (const name of names) {
    const out = path.join(dir, name);
    fs.mkdirSync(out);
    const bench = BENCHES[name];
    process.stdout.write(`\n=== ${name}: ${bench.what} (output in ${out})\n`);
    const cmd = bench.command(out);
    const r = spawnSync(cmd[0], cmd.slice(1), { stdio: 'inherit', env: { ...env, OUT: out } });
    if (r.status !== 0) {
      failed.push(`${name} (${r.status ?? r.signal})`);
      process.stdout.write(`=== ${name} FAILED (${r.status ?? r.signal}); its ratios so far are kept\n`);
    }
  }
  const minutes = ((Date.now() - started.getTime()) / 60000).toFixed(1);
  process.stdout.write(`\n=== summary: paired speed ratios tapkit ÷ peer (above 1 = tapkit faster), ${started.toISOString()}, ${minutes} min\n\n`);
  process.stdout.write(`${summaryTable(readRatios(summary))}\n`);
  process.stdout.write('\nnoise: busy N% = other processes used N% of a CPU during some measurement of the cell; spread N% = rounds disagree by N% of the median; re-measure flagged cells.\n');
  if (failed.length) process.stdout.write(`failed: ${failed.join(', ')}\n`);
  process.stdout.write(`ratios: ${summary}\n`);
  return failed.length ? 1 : 0;
}

process.exitCode = main();
