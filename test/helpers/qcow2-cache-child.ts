/**
 * Drives one qcow2 image with a list of reads in a process of its own (run with
 * `node --expose-gc`), so a test can see what the provider's caches hold and what memory
 * stays behind: `node --expose-gc qcow2-cache-child.js '<json>'` prints one JSON line
 * `{ hashes, peak, limits, retainedBytes, maxRssKiB }`.
 * Input: `{ spec, reads: [offset, length][], concurrency }`.
 *
 * peak: the most each cache held at any time during the reads (sampled after every
 * read); retainedBytes: ArrayBuffer memory after the reads and a full GC, less what was
 * held right after the open (the L1 table and friends).
 */
import * as crypto from 'node:crypto';
import '../../providers';
import { Opener, Vbd } from '../../core';
import { Qcow2Provider } from '../../providers/qcow2';

interface Input {
  spec: string;
  reads: Array<[number, number]>;
  concurrency: number;
}

type Use = ReturnType<Qcow2Provider['cacheUse']>;

/** ArrayBuffer bytes still reachable: after full GCs, with time for V8 to sweep freed buffers. */
async function collect(): Promise<number> {
  const gc = (globalThis as { gc?: () => void }).gc!;
  for (let i = 0; i < 3; i++) {
    gc();
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return process.memoryUsage().arrayBuffers;
}

async function main(): Promise<void> {
  const input = JSON.parse(process.argv[2]) as Input;
  const top = await new Opener({ readOnly: true, warn: () => {} }).open(input.spec);
  if (!(top instanceof Qcow2Provider)) throw new Error(`${input.spec} did not open as qcow2`);
  const vbd = new Vbd(top, { name: input.spec });
  const baseline = await collect();
  const peak: Partial<Use> = {};
  const hashes: string[] = new Array(input.reads.length);
  let next = 0;
  const worker = async () => {
    while (next < input.reads.length) {
      const index = next++;
      const [offset, length] = input.reads[index];
      const buf = new Uint8Array(length);
      await vbd.read(buf, offset);
      hashes[index] = crypto.createHash('sha1').update(buf).digest('hex');
      const use = top.cacheUse();
      for (const key of Object.keys(use) as Array<keyof Use>) peak[key] = Math.max(peak[key] ?? 0, use[key]);
    }
  };
  await Promise.all(Array.from({ length: input.concurrency }, worker));
  const retainedBytes = (await collect()) - baseline;
  const limits = top.cacheUse();
  await vbd.close();
  process.stdout.write(`${JSON.stringify({ hashes, peak, limits, retainedBytes, maxRssKiB: process.resourceUsage().maxRSS })}\n`);
}

main().catch((e: unknown) => {
  process.stderr.write(`${e instanceof Error ? e.stack : String(e)}\n`);
  process.exitCode = 1;
});
