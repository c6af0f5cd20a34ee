/**
 * `npm run fuzz` (after a build): the fuzzing harness with a budget from the environment.
 *
 *   FUZZ_RUNS=100000 npm run fuzz            a long run over every corpus entry
 *   FUZZ_ENTRIES=qcow2-chain,vhd-fixed       only these entries
 *   FUZZ_SEED=1234                           replay a run (the seed is printed)
 *   FUZZ_CASE_TIMEOUT_MS=20000               the time bound of one case
 *   FUZZ_SELF_TEST_ALLOW_CANARY=1            (the harness's own test) let chains reach the canary
 *
 * Prints one JSON line with the summary and the peak RSS; exits 1 when a property failed.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { FUZZ_LIMITS, runFuzz } from './harness';

async function main(): Promise<void> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-fuzz-'));
  try {
    const summary = await runFuzz(root, {
      runs: Number(process.env.FUZZ_RUNS ?? 25),
      seed: process.env.FUZZ_SEED ? Number(process.env.FUZZ_SEED) : undefined,
      entries: process.env.FUZZ_ENTRIES ? process.env.FUZZ_ENTRIES.split(',') : undefined,
      caseTimeoutMs: Number(process.env.FUZZ_CASE_TIMEOUT_MS ?? 20_000),
      limits: FUZZ_LIMITS,
      allowBacking: process.env.FUZZ_SELF_TEST_ALLOW_CANARY ? [root] : undefined,
    });
    for (const failure of summary.failures) process.stderr.write(`${failure}\n\n`);
    process.stdout.write(`${JSON.stringify({ ...summary, limits: FUZZ_LIMITS, maxRssKiB: process.resourceUsage().maxRSS })}\n`);
    process.exitCode = summary.failures.length ? 1 : 0;
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
}

if (require.main === module) void main();
