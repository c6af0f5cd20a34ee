/**
 * The fuzzing harness (test/fuzz/) on a short budget: every corpus entry (qcow2 plain,
 * v2, compressed, extended L2, chain; VHD dynamic, fixed, differencing) gets mutated
 * cases (a fixed seed) in a child process, which must report no failed property and a peak RSS under
 * the metadata-memory limit it ran with (plus what Node itself takes). A long run is
 * `FUZZ_RUNS=100000 npm run fuzz`. The harness's own check: with the canary's tree
 * allowed, it does catch reads that leave the chain.
 */
import test from 'ava';
import { execFile } from 'node:child_process';
import * as path from 'node:path';
import { CORPUS_NAMES } from './fuzz/corpus';
import { FUZZ_LIMITS, type FuzzSummary } from './fuzz/harness';

const RUN = path.join(__dirname, 'fuzz', 'run.js');
const RUNS = Number(process.env.FUZZ_CI_RUNS ?? 20);
/** Fixed in the suite so a landing never depends on luck; long runs (npm run fuzz) pick fresh seeds. */
const SEED = process.env.FUZZ_SEED ?? '20261124';
/** Node, the modules, the corpus buffers: what the process takes besides the metadata it is limited to. */
const BASE_RSS_KIB = 160 * 1024;

interface RunResult {
  code: number | null;
  summary?: FuzzSummary & { maxRssKiB: number };
  stderr: string;
}

function runFuzz(env: Record<string, string>, timeoutMs = 170_000): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(process.execPath, [RUN], { env: { ...process.env, ...env }, timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: 16 << 20 }, (error, stdout, stderr) => {
      const line = stdout.trim().split('\n').pop() ?? '';
      let summary: RunResult['summary'];
      try {
        summary = JSON.parse(line);
      } catch {
        summary = undefined;
      }
      resolve({ code: error ? ((error as { code?: number }).code ?? null) : 0, summary, stderr });
    });
  });
}

const GROUPS = [CORPUS_NAMES.filter((n) => n.startsWith('qcow2')), CORPUS_NAMES.filter((n) => n.startsWith('vhd'))];

for (const group of GROUPS) {
  test(`fuzzing ${group.join(', ')}: typed errors, no bytes from outside the chain, no hang, memory bounded`, async (t) => {
    t.timeout(180_000);
    // A case that takes a minute on a loaded machine is slow, not hung; a hang never ends.
    const { code, summary, stderr } = await runFuzz({ FUZZ_RUNS: String(RUNS), FUZZ_SEED: SEED, FUZZ_ENTRIES: group.join(','), FUZZ_CASE_TIMEOUT_MS: '60000' });
    t.truthy(summary, `the harness printed a summary (exit ${code}): ${stderr}`);
    t.deepEqual(summary!.failures, [], `seed ${summary!.seed}`);
    t.is(code, 0, stderr);
    t.deepEqual(summary!.entries.map((e) => e.name), group);
    for (const entry of summary!.entries) {
      t.is(entry.runs, RUNS, entry.name);
      // The mutations reach both sides: images that still open, and images refused.
      t.true(entry.opened > 0 && entry.refused > 0, `${entry.name}: ${entry.opened} opened, ${entry.refused} refused`);
    }
    const bound = BASE_RSS_KIB + FUZZ_LIMITS['metadata-memory'] / 1024;
    t.true(summary!.maxRssKiB < bound, `peak RSS ${summary!.maxRssKiB} KiB < ${bound} KiB`);
  });
}

test('the harness catches reads that leave the chain (with the canary tree allowed on purpose)', async (t) => {
  t.timeout(180_000);
  const { code, summary } = await runFuzz({ FUZZ_RUNS: '60', FUZZ_SEED: '1', FUZZ_ENTRIES: 'qcow2-plain', FUZZ_SELF_TEST_ALLOW_CANARY: '1' });
  t.is(code, 1);
  t.is(summary!.failures.length, 1);
  t.regex(summary!.failures[0], /bytes from outside the chain/);
});
