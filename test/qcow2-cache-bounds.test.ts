/**
 * The qcow2 caches stay within their bounds under access patterns that would grow them
 * without end: reads spread over many more L2 tables than l2-cache-size holds, and small
 * reads scattered over many more compressed clusters than the decoded-cluster cache
 * holds. Each image is made by qemu-img/qemu-io and driven in a child process
 * (helpers/qcow2-cache-child.ts), which reports the most each cache held and the
 * ArrayBuffer memory left after a full GC. The LRUs themselves are checked against a
 * model with fast-check.
 */
import test from 'ava';
import fc from 'fast-check';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ClusterCache, PromiseLru } from '../providers/qcow2/lru';
import { qemuImg, qemuIo } from './helpers/qemu-images';
import { describeRun, run } from './helpers/run';
import { tempDir } from './helpers/temp';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
/** Allowance for what the child's own reads and the runtime leave in ArrayBuffers. */
const SLACK = 1 * MiB;

interface Use {
  l2Bytes: number;
  l2LimitBytes: number;
  decodedBytes: number;
  decodedLimitBytes: number;
  spareInputBytes: number;
  spareInputLimitBytes: number;
}

interface ChildAnswer {
  hashes: string[];
  peak: Use;
  limits: Use;
  retainedBytes: number;
}

const CHILD = path.join(__dirname, 'helpers', 'qcow2-cache-child.js');

async function driveInChild(spec: string, reads: Array<[number, number]>, concurrency: number): Promise<ChildAnswer> {
  const args = ['--expose-gc', CHILD, JSON.stringify({ spec, reads, concurrency })];
  const r = await run(process.execPath, args, { timeoutMs: 120_000 });
  if (r.code !== 0) throw new Error(`cache child failed: ${describeRun('node', [CHILD], r, 120_000)}`);
  return JSON.parse(r.stdout.trim().split('\n').pop() ?? '') as ChildAnswer;
}

/** A fixed shuffle (the same every run), so a failure can be replayed. */
function shuffled<T>(items: T[], seed: number): T[] {
  const out = [...items];
  let x = seed;
  for (let i = out.length - 1; i > 0; i--) {
    x = (x * 1103515245 + 12345) % 2 ** 31;
    const j = x % (i + 1);
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

const sha1 = (bytes: Uint8Array) => crypto.createHash('sha1').update(bytes).digest('hex');

test('reads over 32 L2 tables keep at most l2-cache-size of them, and no more memory than the bounds', async (t) => {
  // 1 MiB clusters: each L2 table is 1 MiB and maps 128 GiB. One 64 KiB write per table.
  const dir = tempDir(t, 'tapkit-qcow2-bounds-');
  const image = path.join(dir, 'tables.qcow2');
  const tables = 32;
  const span = 128 * GiB;
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=1M', image, `${(tables * span) / GiB}G`]);
  await qemuIo(image, Array.from({ length: tables }, (_, i) => `write -P ${i + 1} ${i * span} 64k`));

  // Three passes over every table, each in another order, eight reads in flight.
  const reads: Array<[number, number]> = [];
  const expected: string[] = [];
  for (let pass = 0; pass < 3; pass++) {
    for (const i of shuffled([...Array(tables).keys()], pass + 1)) {
      reads.push([i * span + pass * 8192, 4096]);
      expected.push(sha1(Buffer.alloc(4096, i + 1)));
    }
  }
  const answer = await driveInChild(`qcow2,l2-cache-size=4M:${image}`, reads, 8);
  t.deepEqual(answer.hashes, expected, 'every read returned what qemu-io wrote');

  const { limits, peak } = answer;
  t.is(limits.l2LimitBytes, 4 * MiB, 'l2-cache-size=4M holds four 1 MiB tables');
  t.true(tables * MiB >= 8 * limits.l2LimitBytes, 'the reads touch far more tables than the cache holds');
  t.true(peak.l2Bytes <= limits.l2LimitBytes, `L2 cache peaked at ${peak.l2Bytes} bytes, over its ${limits.l2LimitBytes}`);
  t.true(peak.l2Bytes > 0);
  const bound = limits.l2LimitBytes + limits.decodedLimitBytes + limits.spareInputLimitBytes + SLACK;
  t.true(answer.retainedBytes <= bound, `${answer.retainedBytes} bytes retained after the reads, over the ${bound}-byte bound`);
});

test('small reads over 40 compressed clusters keep at most the decoded-cluster cache, and no more memory than the bounds', async (t) => {
  // 1 MiB clusters of distinct text, every one stored compressed by qemu-img.
  const clusters = 40;
  const source = Buffer.alloc(clusters * MiB);
  for (let i = 0; i < clusters; i++) source.fill(`cluster ${i}: compressible text for the decoded-cluster cache test. `, i * MiB, (i + 1) * MiB);
  const dir = tempDir(t, 'tapkit-qcow2-bounds-');
  const raw = path.join(dir, 'text.raw');
  const image = path.join(dir, 'compressed.qcow2');
  fs.writeFileSync(raw, source);
  await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=1M', raw, image]);
  const map = JSON.parse(await qemuImg(['map', '--output=json', image])) as Array<{ data: boolean; compressed?: boolean }>;
  t.true(map.every((m) => m.data && m.compressed !== false), 'qemu-img stored every cluster compressed');

  // 4 KiB reads at scattered places, each cluster visited several times far apart.
  const reads: Array<[number, number]> = [];
  let x = 7;
  for (let n = 0; n < 200; n++) {
    x = (x * 1103515245 + 12345) % 2 ** 31;
    const cluster = x % clusters;
    const within = (Math.floor(x / clusters) % 256) * 4096;
    reads.push([cluster * MiB + within, 4096]);
  }
  const answer = await driveInChild(`qcow2:${image}`, reads, 16);
  t.deepEqual(answer.hashes, reads.map(([offset, length]) => sha1(source.subarray(offset, offset + length))), 'every read returned the source bytes');

  const { limits, peak } = answer;
  t.true(clusters * MiB >= 8 * limits.decodedLimitBytes, 'the reads touch far more clusters than the cache holds');
  t.true(peak.decodedBytes > 0);
  t.true(peak.decodedBytes <= limits.decodedLimitBytes, `decoded clusters peaked at ${peak.decodedBytes} bytes, over ${limits.decodedLimitBytes}`);
  t.true(peak.spareInputBytes <= limits.spareInputLimitBytes, `spare input buffers peaked at ${peak.spareInputBytes} bytes, over ${limits.spareInputLimitBytes}`);
  const bound = limits.l2LimitBytes + limits.decodedLimitBytes + limits.spareInputLimitBytes + SLACK;
  t.true(answer.retainedBytes <= bound, `${answer.retainedBytes} bytes retained after the reads, over the ${bound}-byte bound`);
});

/** The keys an LRU of `capacity` holds after `used` (oldest first): the last `capacity` distinct ones. */
function lruModel(used: number[], capacity: number): number[] {
  const order: number[] = [];
  for (const key of used) {
    const at = order.indexOf(key);
    if (at >= 0) order.splice(at, 1);
    order.push(key);
    if (order.length > capacity) order.shift();
  }
  return order;
}

test('the L2 table LRU holds at most its capacity: the most recently used tables, loaded once while held', async (t) => {
  await fc.assert(
    fc.asyncProperty(fc.integer({ min: 1, max: 6 }), fc.array(fc.record({ key: fc.nat({ max: 12 }), peek: fc.boolean() }), { maxLength: 60 }), async (capacity, ops) => {
      const lru = new PromiseLru<string>(capacity);
      const used: number[] = [];
      for (const { key, peek } of ops) {
        const held = lruModel(used, capacity).includes(key);
        if (peek) {
          const value = lru.peek(key);
          if (held) {
            t.is(value, `table ${key}`);
            used.push(key);
          } else t.is(value, undefined);
        } else {
          let loaded = false;
          const value = await lru.get(key, async () => {
            loaded = true;
            return `table ${key}`;
          });
          t.is(value, `table ${key}`);
          t.is(loaded, !held, held ? 'a held table is not read again' : 'a missing table is read');
          used.push(key);
          await Promise.resolve(); // let the load's bookkeeping run
        }
        t.true(lru.size <= capacity);
      }
    }),
    { numRuns: 200 },
  );
});

test('the decoded-cluster cache holds at most its capacity, recycling buffers: the most recently used clusters', (t) => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 6 }), fc.array(fc.nat({ max: 12 }), { maxLength: 60 }), (capacity, keys) => {
      const cache = new ClusterCache(capacity, 4);
      const buffers = new Set<Uint8Array>();
      const used: number[] = [];
      for (const key of keys) {
        const held = lruModel(used, capacity).includes(key);
        let decoded = false;
        const cluster = cache.fill(key, (into) => {
          decoded = true;
          into.fill(key);
        });
        t.is(decoded, !held);
        t.deepEqual([...cluster], [key, key, key, key]);
        buffers.add(cluster);
        used.push(key);
        t.true(cache.size <= capacity);
      }
      t.true(buffers.size <= capacity, 'no more buffers than the capacity were ever made');
    }),
    { numRuns: 200 },
  );
});
