/**
 * The cache filter over writable lowers: reads always equal a model of the disk through
 * random concurrent reads, writes, trims and zeroes (with a cache small enough to evict),
 * misses for one block share one lower read, and a file-backed cache is kept across
 * restarts only while the lower bytes are the ones it saved.
 */
import 'reflect-metadata';
import '../providers';
import test from 'ava';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { openSpec } from '../core/open';
import type { Provider } from '../core/provider';
import { Vbd } from '../core/vbd';
import { FaultServer } from './helpers/fault-server';
import { tempDir } from './helpers/temp';

/** A small deterministic PRNG, so a failure can be replayed from its seed. */
function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let x = s;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

async function readAll(p: Provider | Vbd): Promise<Buffer> {
  const buf = Buffer.alloc(p.info().size);
  await p.read(buf, 0);
  return buf;
}

const DISK = 1 << 20;

for (const lowerKind of ['memory', 'raw'] as const) {
  test(`random concurrent I/O through a small cache over ${lowerKind} matches a model`, async (t) => {
    const dir = tempDir(t, 'tapkit-cache-');
    let lowerSpec = `memory:${DISK}`;
    if (lowerKind === 'raw') {
      const file = path.join(dir, 'disk.raw');
      fs.writeFileSync(file, Buffer.alloc(DISK));
      lowerSpec = `raw:${file}`;
    }
    const seed = process.env.SEED ? Number(process.env.SEED) : Math.floor(Math.random() * 2 ** 31);
    const random = prng(seed);
    const provider = await openSpec(`cache,size=64K,block=4K:${lowerSpec}`, { warn: () => {} });
    const vbd = new Vbd(provider);
    t.teardown(() => vbd.close());
    const model = Buffer.alloc(DISK);
    const pick = (max: number) => Math.floor(random() * max);
    for (let round = 0; round < 100; round++) {
      // Writes in one round never overlap each other (the model needs an order); reads overlap anything.
      const written: Array<[number, number]> = [];
      const ops: Array<Promise<void>> = [];
      const checks: Array<() => void> = [];
      const before = Buffer.from(model);
      for (let i = 0; i < 12; i++) {
        const offset = pick(DISK - 1);
        const length = Math.min(DISK - offset, 1 + pick(20_000));
        const kind = pick(10);
        const overlapsWrite = written.some(([o, l]) => offset < o + l && o < offset + length);
        if (kind < 4 || overlapsWrite) {
          const buf = Buffer.alloc(length);
          const expectOld = before.subarray(offset, offset + length);
          ops.push(vbd.read(buf, offset));
          checks.push(() => {
            if (!overlapsWrite && !written.some(([o, l]) => offset < o + l && o < offset + length)) {
              t.true(buf.equals(expectOld), `seed ${seed}: read at ${offset}+${length} in round ${round}`);
            }
          });
          continue;
        }
        written.push([offset, length]);
        if (kind < 8) {
          const data = crypto.randomBytes(length);
          data.copy(model, offset);
          ops.push(vbd.write(data, offset, {}));
        } else if (kind < 9) {
          model.fill(0, offset, offset + length);
          ops.push(vbd.zero(offset, length, { mayTrim: true }));
        } else {
          // Trim may leave old bytes or zeros: write zeros after it, so the model stays exact.
          model.fill(0, offset, offset + length);
          ops.push(vbd.trim(offset, length, {}).then(() => vbd.write(Buffer.alloc(length), offset, {})));
        }
      }
      await Promise.all(ops);
      for (const check of checks) check();
      t.true((await readAll(vbd)).equals(model), `seed ${seed}: after round ${round}`);
    }
    t.true(((provider.describe!() as { hits: number }).hits) > 0, 'the cache was used');
  });
}

test('concurrent misses for one block share one lower read', async (t) => {
  const server = await new FaultServer().start();
  t.teardown(() => server.stop());
  const data = crypto.randomBytes(1 << 20);
  server.put('/d', data);
  const p = await openSpec(`cache,size=1M,block=64K:http,readahead=0:${server.base}/d`, { readOnly: true });
  t.teardown(() => p.close());
  const gets = () => server.log.filter((r) => r.method === 'GET').length;
  const start = gets();
  const bufs = Array.from({ length: 10 }, () => Buffer.alloc(4096));
  await Promise.all(bufs.map((b, i) => p.read(b, i * 100)));
  bufs.forEach((b, i) => t.true(b.equals(data.subarray(i * 100, i * 100 + 4096))));
  t.is(gets() - start, 1);
  // A read spanning cached and missing blocks asks only for the missing ones, in one request.
  const wide = Buffer.alloc(4 * 65536);
  await p.read(wide, 0);
  t.true(wide.equals(data.subarray(0, wide.length)));
  t.is(gets() - start, 2);
  t.is(server.log[server.log.length - 1].range, `bytes=65536-262143`);
});

test('a file-backed cache over a file is kept across restarts, and discarded when the file changed underneath', async (t) => {
  const dir = tempDir(t, 'tapkit-cache-');
  const file = path.join(dir, 'disk.raw');
  const content = crypto.randomBytes(DISK);
  fs.writeFileSync(file, content);
  const cacheFile = path.join(dir, 'c.cache');
  const spec = `cache,size=512K,block=16K,file=${cacheFile}:raw:${file}`;

  const first = new Vbd(await openSpec(spec, { warn: () => {} }));
  await readAll(first);
  const patch = crypto.randomBytes(5000);
  await first.write(patch, 70_000, {});
  patch.copy(content, 70_000);
  t.true((await readAll(first)).equals(content));
  await first.close();

  const second = await openSpec(spec, { warn: () => {} });
  t.true((second.describe!() as { cachedBlocks: number }).cachedBlocks > 0, 'warm after a clean close');
  t.true((await readAll(second)).equals(content));
  await second.close();

  // Someone else changes the file: the cache must not answer with what it saved.
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, Buffer.alloc(DISK, 0xab), 0, DISK, 0);
  fs.closeSync(fd);
  fs.utimesSync(file, new Date(), new Date(Date.now() + 5000));
  const warnings: string[] = [];
  const third = await openSpec(spec, { warn: (m) => warnings.push(m) });
  t.teardown(() => third.close());
  t.is((third.describe!() as { cachedBlocks: number }).cachedBlocks, 0);
  t.true(warnings.some((w) => /another version/.test(w)));
  t.true((await readAll(third)).equals(Buffer.alloc(DISK, 0xab)));
});

test('a cache over a memory disk (no validator) is not kept, with a warning', async (t) => {
  const dir = tempDir(t, 'tapkit-cache-');
  const warnings: string[] = [];
  const p = await openSpec(`cache,file=${path.join(dir, 'c')}:memory:1M`, { warn: (m) => warnings.push(m) });
  await p.read(Buffer.alloc(4096), 0);
  await p.close();
  t.true(warnings.some((w) => /no validator/.test(w)));
  t.false(fs.existsSync(path.join(dir, 'c.index')));
});

test('bad cache options are usage errors', async (t) => {
  await t.throwsAsync(openSpec('cache,block=3000:memory:1M'), { message: /power of two/ });
  await t.throwsAsync(openSpec('cache,size=1K,block=64K:memory:1M'), { message: /holds no block/ });
  await t.throwsAsync(openSpec('cache,colour=red:memory:1M'), { message: /no option 'colour'/ });
});

test('writes through a cache over a read-only source are EROFS', async (t) => {
  const server = await new FaultServer().start();
  t.teardown(() => server.stop());
  server.put('/d', crypto.randomBytes(65536));
  const p = await openSpec(`cache:http:${server.base}/d`, { readOnly: true });
  t.teardown(() => p.close());
  await t.throwsAsync(p.write!(Buffer.alloc(512), 0, {}), { message: /read-only/ });
});

test('a corrupt or hostile saved index is ignored, never trusted', async (t) => {
  const dir = tempDir(t, 'tapkit-cache-');
  const file = path.join(dir, 'disk.raw');
  const content = crypto.randomBytes(DISK);
  fs.writeFileSync(file, content);
  const cacheFile = path.join(dir, 'c.cache');
  const spec = `cache,size=256K,block=16K,file=${cacheFile}:raw:${file}`;
  const first = await openSpec(spec, { warn: () => {} });
  await readAll(first);
  await first.close();
  const saved = JSON.parse(fs.readFileSync(`${cacheFile}.index`, 'utf8'));

  fs.writeFileSync(`${cacheFile}.index`, '{"version":1,"identity":');
  const warnings: string[] = [];
  const truncated = await openSpec(spec, { warn: (m) => warnings.push(m) });
  t.is((truncated.describe!() as { cachedBlocks: number }).cachedBlocks, 0);
  t.true(warnings.some((w) => /unreadable index/.test(w)), JSON.stringify(warnings));
  t.true((await readAll(truncated)).equals(content));
  await truncated.close();

  // Same identity, but entries pointing past the disk or the slots, sharing a slot, or
  // naming a slot that holds another block (its checksum gives it away).
  const [b0, s0, c0] = saved.entries[0];
  const [, s1] = saved.entries[1];
  const hostile = { ...saved, entries: [[1e9, 0, 0], [0, 99999, 0], [-1, 1, 0], ['x', 3, 0], [3, 1.5, 0], [b0, s0, c0], [b0 + 100, s0, c0], [b0 + 1, s1, c0]] };
  fs.writeFileSync(`${cacheFile}.index`, JSON.stringify(hostile));
  const hostileWarnings: string[] = [];
  const third = await openSpec(spec, { warn: (m) => hostileWarnings.push(m) });
  t.teardown(() => third.close());
  t.is((third.describe!() as { cachedBlocks: number }).cachedBlocks, 2);
  t.true((await readAll(third)).equals(content));
  t.true(hostileWarnings.some((w) => /does not match its checksum/.test(w)), JSON.stringify(hostileWarnings));
});

test('a cache file that fails under the cache costs lower reads, never a failed or wrong read', async (t) => {
  const dir = tempDir(t, 'tapkit-cache-');
  const file = path.join(dir, 'disk.raw');
  const content = crypto.randomBytes(DISK);
  fs.writeFileSync(file, content);
  const cacheFile = path.join(dir, 'c.cache');
  const warnings: string[] = [];
  const p = await openSpec(`cache,size=256K,block=16K,file=${cacheFile}:raw:${file}`, { warn: (m) => warnings.push(m) });
  t.teardown(() => p.close());
  t.true((await readAll(p)).equals(content));
  // Blocks are stored after the read that fetched them returns: wait (bounded) until they are.
  const cached = () => (p.describe!() as { cachedBlocks: number }).cachedBlocks;
  for (let i = 0; i < 200 && cached() < 16; i++) await new Promise((r) => setTimeout(r, 25));
  t.is(cached(), 16);
  // The cache file loses its bytes under the open cache: every hit now fails to read.
  fs.truncateSync(cacheFile, 0);
  t.true((await readAll(p)).equals(content));
  t.true(warnings.some((w) => /could not read block \d+ from .*c\.cache/.test(w)), JSON.stringify(warnings));
});
