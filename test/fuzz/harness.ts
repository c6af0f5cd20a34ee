/**
 * The fuzzing harness for every format. Each case restores a corpus chain, mutates one
 * of its files (blind and structure-aware mutations), then opens the spec and reads it
 * (start, end, a few places between, extents), asserting:
 *
 *  - the open succeeds or fails with a BlockError, never an untyped exception (a
 *    TypeError or RangeError wrapped by the opener counts as untyped);
 *  - every read returns data or fails with a BlockError, and no read returns bytes of
 *    the canary file outside the tree (or of /etc/passwd): reads stay inside the chain;
 *  - the case finishes within a time bound (a hang fails the property);
 *  - (checked by the caller on the process) peak memory stays under the limits given.
 */
import fc from 'fast-check';
import * as fs from 'node:fs';
import '../../providers';
import { isBlockError, Opener, type LimitValues, type Provider } from '../../core';
import { buildCorpus, CANARY_MARKER, type CorpusImage } from './corpus';
import { caseArb, type Mutation } from './mutators';
import { mutateQcow2 } from './qcow2-mutators';
import { mutateVhd } from './vhd-mutators';

export interface FuzzOptions {
  /** Cases per corpus entry. */
  runs: number;
  seed?: number;
  /** Corpus entries to fuzz (default: all). */
  entries?: string[];
  caseTimeoutMs: number;
  /** Limits the opener runs with: the memory bound the caller checks. */
  limits: Partial<LimitValues>;
  /** Only for the harness's own test: trees backing files may reach besides the corpus (the canary's, to see a leak caught). */
  allowBacking?: string[];
}

export interface EntrySummary {
  name: string;
  runs: number;
  opened: number;
  refused: number;
  readErrors: number;
  reads: number;
}

export interface FuzzSummary {
  seed: number;
  entries: EntrySummary[];
  /** fast-check's reports of failed properties (with counterexample and seed). */
  failures: string[];
}

/** The limits the fuzzed opens run with; the caller checks peak RSS against metadata-memory. */
export const FUZZ_LIMITS = { 'metadata-memory': 64 * 1024 * 1024, 'l1-size': 8 * 1024 * 1024, 'bat-entries': 1 << 20 };

const MARKERS = [CANARY_MARKER.subarray(2, 10), Buffer.from('root:x:0:0:')];
const READ_CHUNK = 128 * 1024;

/** An exception that is a bug, not a refusal: untyped, or a typed wrapper around a programming error. */
function untyped(e: unknown): string | undefined {
  if (!isBlockError(e)) return `untyped ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}`;
  for (let cause = (e as Error).cause; cause; cause = (cause as Error).cause) {
    if (cause instanceof TypeError || cause instanceof RangeError || cause instanceof ReferenceError || cause instanceof SyntaxError) {
      return `a ${cause.name} wrapped as ${(e as Error).message}`;
    }
    if (!(cause instanceof Error)) break;
  }
  return undefined;
}

class Bug extends Error {}

function leaked(buf: Uint8Array): string | undefined {
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  for (const marker of MARKERS) if (b.indexOf(marker) >= 0) return `a read returned bytes from outside the chain ('${marker.toString('latin1')}')`;
  return undefined;
}

async function withTimeout<T>(work: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([work, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Bug(`${what} did not finish within ${ms} ms`)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** Opens and reads one (mutated) chain; throws Bug on a property violation. */
async function exercise(spec: string, options: FuzzOptions, stats: EntrySummary): Promise<void> {
  let top: Provider;
  try {
    top = await new Opener({ readOnly: true, warn: () => {}, limits: options.limits, backing: { allow: options.allowBacking ?? [] } }).open(spec);
  } catch (e) {
    const bug = untyped(e);
    if (bug) throw new Bug(`open: ${bug}`);
    stats.refused++;
    return;
  }
  stats.opened++;
  try {
    const size = top.info().size;
    const places = [0, size - READ_CHUNK, Math.floor(size * 0.37), Math.floor(size * 0.5), Math.floor(size * 0.81)].map((p) => Math.max(0, Math.floor(p / 512) * 512));
    // The first 2 MiB in chunks, then single chunks elsewhere; odd lengths too.
    for (let at = READ_CHUNK; at < Math.min(size, 2 * 1024 * 1024); at += READ_CHUNK) places.push(at);
    for (const [i, at] of places.entries()) {
      const length = Math.min(READ_CHUNK - (i % 3) * 511, size - at);
      if (length <= 0) continue;
      const buf = new Uint8Array(length);
      stats.reads++;
      try {
        await top.read(buf, at);
      } catch (e) {
        const bug = untyped(e);
        if (bug) throw new Bug(`read at ${at}: ${bug}`);
        stats.readErrors++;
        continue;
      }
      const leak = leaked(buf);
      if (leak) throw new Bug(`read at ${at} (${length} bytes): ${leak}`);
    }
    if (top.extents && top.capabilities().extents) {
      let at = 0;
      for (let calls = 0; calls < 16 && at < size; calls++) {
        try {
          const runs = await top.extents(at, Math.min(size - at, 1 << 30));
          if (runs.length === 0) break;
          const last = runs[runs.length - 1];
          if (last.offset + last.length <= at) throw new Bug(`extents at ${at} made no progress`);
          at = last.offset + last.length;
        } catch (e) {
          if (e instanceof Bug) throw e;
          const bug = untyped(e);
          if (bug) throw new Bug(`extents at ${at}: ${bug}`);
          break;
        }
      }
    }
  } finally {
    try {
      await top.close();
    } catch (e) {
      const bug = untyped(e);
      if (bug) throw new Bug(`close: ${bug}`);
    }
  }
}

function mutate(entry: CorpusImage, file: string, bytes: Buffer, mutations: Mutation[], canary: string): Buffer {
  let out: Buffer = Buffer.from(bytes);
  for (const m of mutations) out = entry.format === 'qcow2' ? mutateQcow2(out, m, { file, canary }) : mutateVhd(out, m, { file, canary });
  return out;
}

export async function runFuzz(root: string, options: FuzzOptions): Promise<FuzzSummary> {
  const corpus = await buildCorpus(root, options.entries);
  const seed = options.seed ?? Date.now() % 2 ** 31;
  const summary: FuzzSummary = { seed, entries: [], failures: [] };
  for (const entry of corpus.entries) {
    const pristine = entry.files.map((f) => fs.readFileSync(f));
    const stats: EntrySummary = { name: entry.name, runs: 0, opened: 0, refused: 0, readErrors: 0, reads: 0 };
    summary.entries.push(stats);
    const property = fc.asyncProperty(caseArb, async ({ file, mutations }) => {
      stats.runs++;
      entry.files.forEach((f, i) => fs.writeFileSync(f, pristine[i]));
      const index = file % entry.files.length;
      fs.writeFileSync(entry.files[index], mutate(entry, entry.files[index], pristine[index], mutations, corpus.canary));
      await withTimeout(exercise(entry.spec, options, stats), options.caseTimeoutMs, `${entry.name}: open and reads`);
    });
    const details = await fc.check(property, { numRuns: options.runs, seed, endOnFailure: false });
    if (details.failed) {
      const cause = details.errorInstance instanceof Error ? details.errorInstance.message : String(details.errorInstance);
      summary.failures.push(`${entry.name}: ${cause}\n${fc.defaultReportMessage(details) ?? 'failed'}`);
    }
    entry.files.forEach((f, i) => fs.writeFileSync(f, pristine[i]));
  }
  return summary;
}
