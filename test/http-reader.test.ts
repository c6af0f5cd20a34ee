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
