/**
 * providers/http/reader.ts on its own: it knows nothing of HTTP (a fetch function fills
 * buffers), so its scheduling is checked with a fetch that records the order of requests
 * and answers when told.
 */
import test from 'ava';
import { RangeReader } from '../providers/http/reader';

const MiB = 1 << 20;

/** A fetch that fills buffers with the low byte of each position, answered one at a time on request. */
function recordingFetch() {
  const started: Array<{ offset: number; length: number; answer(): void }> = [];
  const fetch = (targets: readonly Uint8Array[], offset: number) =>
    new Promise<void>((resolve) => {
      const length = targets.reduce((s, t) => s + t.length, 0);
      started.push({
        offset,
        length,
        answer: () => {
          let at = offset;
          for (const t of targets) for (let i = 0; i < t.length; i++) t[i] = at++ & 0xff;
          resolve();
        },
      });
    });
  return { started, fetch };
}

const settle = () => new Promise((r) => setImmediate(r));

test('a read the disk was asked for goes before readahead chunks waiting for a slot', async (t) => {
  const { started, fetch } = recordingFetch();
  const reader = new RangeReader(fetch, { size: 64 * MiB, maxInFlight: 1, maxRequest: 2 * MiB, readahead: 8 * MiB });
  // Small sequential reads start readahead: chunks 0..8 queue behind the first request.
  const reads = [reader.read(Buffer.alloc(4096), 0), reader.read(Buffer.alloc(4096), 4096), reader.read(Buffer.alloc(4096), 8192)];
  await settle();
  t.is(started.length, 1, 'one slot');
  // A guest read far away arrives while readahead waits.
  const far = Buffer.alloc(4096);
  const farRead = reader.read(far, 40 * MiB);
  started[0].answer();
  await settle();
  t.is(started.length, 2);
  t.is(started[1].offset, 40 * MiB, `the asked-for read went next (requests so far: ${started.map((s) => s.offset).join(', ')})`);
  started[1].answer();
  await farRead;
  t.is(far[0], (40 * MiB) & 0xff);
  // The readahead chunks still come, in order, and serve the sequential reads.
  for (let i = 2; i < 40 && started.length >= i; i++) {
    started[i - 1].answer();
    await settle();
  }
  for (const s of started) s.answer();
  await Promise.all(reads);
  const chunkOffsets = started.slice(2).map((s) => s.offset);
  t.deepEqual(chunkOffsets, [...chunkOffsets].sort((a, b) => a - b));
  t.true(chunkOffsets.length >= 8, `readahead fetched ${chunkOffsets.length} chunks`);
});

test('asked-for reads that continue each other are merged into one request while they wait', async (t) => {
  const { started, fetch } = recordingFetch();
  const reader = new RangeReader(fetch, { size: 64 * MiB, maxInFlight: 1, maxRequest: 2 * MiB, readahead: 0 });
  const first = reader.read(Buffer.alloc(MiB), 10 * MiB);
  await settle();
  const bufs = [Buffer.alloc(MiB / 2), Buffer.alloc(MiB / 2), Buffer.alloc(MiB / 2)];
  const rest = bufs.map((b, i) => reader.read(b, (i * MiB) / 2));
  started[0].answer();
  await first;
  await settle();
  t.deepEqual(started.slice(1).map((s) => [s.offset, s.length]), [[0, (3 * MiB) / 2]]);
  started[1].answer();
  await Promise.all(rest);
  t.is(bufs[2][1], ((MiB + 1) & 0xff));
});

/** A fetch that answers at once, recording each request. */
function answeringFetch(fail?: (offset: number) => boolean) {
  const requests: Array<{ offset: number; length: number; targets: readonly Uint8Array[] }> = [];
  const fetch = async (targets: readonly Uint8Array[], offset: number) => {
    requests.push({ offset, length: targets.reduce((s, t) => s + t.length, 0), targets });
    await settle();
    if (fail?.(offset)) throw new Error(`no bytes at ${offset}`);
    let at = offset;
    for (const t of targets) for (let i = 0; i < t.length; i++) t[i] = at++ & 0xff;
  };
  return { requests, fetch };
}

const expectBytes = (views: Uint8Array[], offset: number) => {
  let at = offset;
  for (const v of views) for (const b of v) if (b !== (at++ & 0xff)) return false;
  return true;
};

test('lend: a sequential reader gets views of readahead chunks (any read size), earlier reads are declined', async (t) => {
  const { requests, fetch } = answeringFetch();
  const reader = new RangeReader(fetch, { size: 64 * MiB, maxInFlight: 4, maxRequest: 2 * MiB, readahead: 8 * MiB, chunkSize: 2 * MiB });
  // Not sequential yet: declined (the caller reads into its own buffer), and asking the same range of read does not count twice.
  t.is(reader.lend(0, MiB), undefined);
  await reader.read(Buffer.alloc(MiB), 0);
  t.is(reader.lend(MiB, MiB), undefined);
  await reader.read(Buffer.alloc(MiB), MiB);
  // The third sequential 1 MiB read starts readahead in 2 MiB chunks and is lent from them.
  const lent = reader.lend(2 * MiB, MiB);
  t.truthy(lent);
  const views = await lent!;
  t.true(expectBytes(views, 2 * MiB));
  t.is(views.reduce((s, v) => s + v.length, 0), MiB);
  const chunkRequests = requests.filter((r) => r.length === 2 * MiB).map((r) => r.offset);
  t.deepEqual(chunkRequests.slice(0, 5), [2 * MiB, 4 * MiB, 6 * MiB, 8 * MiB, 10 * MiB]);
  // A read across two chunks gets one view of each.
  const across = await reader.lend(3 * MiB + 4096, 2 * MiB)!;
  t.is(across.length, 2);
  t.true(expectBytes(across, 3 * MiB + 4096));
  reader.giveBack(views);
  reader.giveBack(across);
});

test('lend: a chunk buffer is reused only once its views are given back and the window has passed it', async (t) => {
  const { requests, fetch } = answeringFetch();
  const reader = new RangeReader(fetch, { size: 256 * MiB, maxInFlight: 4, maxRequest: 2 * MiB, readahead: 4 * MiB, chunkSize: MiB });
  await reader.read(Buffer.alloc(MiB), 0);
  await reader.read(Buffer.alloc(MiB), MiB);
  // Hold the views of chunk 2 (bytes 2..3 MiB) and never give them back.
  const held = await reader.lend(2 * MiB, MiB)!;
  const heldCopy = Buffer.from(held[0]);
  // Read on far past it, giving every other lend back.
  let at = 3 * MiB;
  const given = new Set<ArrayBufferLike>();
  for (; at < 60 * MiB; at += MiB) {
    const views = await reader.lend(at, MiB)!;
    t.true(expectBytes(views, at), `bytes at ${at}`);
    for (const v of views) given.add(v.buffer);
    reader.giveBack(views);
  }
  // The held view still shows its bytes: its buffer was never handed to another chunk.
  t.deepEqual(Buffer.from(held[0]), heldCopy);
  const targets = requests.flatMap((r) => r.targets);
  t.is(targets.filter((b) => b.buffer === held[0].buffer).length, 1, 'the held buffer was fetched into once');
  // Buffers given back were reused: far fewer distinct buffers than chunks fetched.
  const distinct = new Set(targets.filter((b) => b.length === MiB).map((b) => b.buffer));
  t.true(distinct.size < 20, `${distinct.size} distinct chunk buffers for ${targets.length} requests`);
});

test('lend: a chunk that cannot be fetched fails the lend, and later reads still work', async (t) => {
  let failing = true;
  const { fetch } = answeringFetch((offset) => failing && offset === 4 * MiB);
  const reader = new RangeReader(fetch, { size: 64 * MiB, maxInFlight: 4, maxRequest: 2 * MiB, readahead: 4 * MiB, chunkSize: MiB });
  await reader.read(Buffer.alloc(MiB), 0);
  await reader.read(Buffer.alloc(MiB), MiB);
  reader.giveBack(await reader.lend(2 * MiB, MiB)!);
  reader.giveBack(await reader.lend(3 * MiB, MiB)!);
  await t.throwsAsync(reader.lend(4 * MiB, MiB)!, { message: /no bytes at 4194304/ });
  failing = false;
  // The failed chunk is forgotten: the next attempt is declined or fetched again, and right.
  const again = reader.lend(4 * MiB, MiB);
  const buf = Buffer.alloc(MiB);
  if (again) t.true(expectBytes(await again, 4 * MiB));
  else {
    await reader.read(buf, 4 * MiB);
    t.true(expectBytes([buf], 4 * MiB));
  }
});
