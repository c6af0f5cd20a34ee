/**
 * Runs one open (and optionally a read of the first bytes) in a process of its own, so a
 * test can read its peak memory: `node open-child.js '<json>'` prints one JSON line
 * `{ ok, error?: {name, code, message, field?, limit?}, maxRssKiB, readBytes }`.
 * Input: `{ spec, options?: OpenOptions (JSON-able), readBytes?: number }`.
 */
import '../../providers';
import { isBlockError, Opener, Vbd, type OpenOptions } from '../../core';

interface Input {
  spec: string;
  options?: OpenOptions;
  /** Read this many bytes from offset 0 (and the same at the end) after opening. */
  readBytes?: number;
}

async function main(): Promise<void> {
  const input = JSON.parse(process.argv[2]) as Input;
  let result: Record<string, unknown>;
  try {
    const top = await new Opener({ readOnly: true, warn: () => {}, ...input.options }).open(input.spec);
    const vbd = new Vbd(top, { name: input.spec });
    try {
      const size = vbd.info().size;
      const n = Math.min(size, input.readBytes ?? 0);
      if (n > 0) {
        const buf = new Uint8Array(n);
        await vbd.read(buf, 0);
        await vbd.read(buf, size - n);
      }
    } finally {
      await vbd.close();
    }
    result = { ok: true };
  } catch (e) {
    const err = e as Error & { code?: string; field?: string; limit?: string };
    result = { ok: false, error: { name: err.name, typed: isBlockError(e), code: err.code, message: err.message, field: err.field, limit: err.limit } };
  }
  result.maxRssKiB = process.resourceUsage().maxRSS;
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

void main();
