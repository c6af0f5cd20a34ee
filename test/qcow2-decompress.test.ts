/**
 * One compressed cluster, decoded: exactly one cluster or a DecompressError, with the
 * reused inflate stream recovering after damaged input. Deflate data made by Node's zlib
 * (what qemu writes: raw deflate of one cluster, followed by whatever the sector rounding
 * carries along).
 */
import test from 'ava';
import * as zlib from 'node:zlib';
import { decompressCluster, DecompressError } from '../providers/qcow2/decompress';
import { ClusterCache } from '../providers/qcow2/lru';

const CLUSTER = 64 * 1024;
const text = Buffer.alloc(CLUSTER);
text.fill('a line of compressible text for a qcow2 cluster. ');

test('a cluster decodes into a new buffer or into the one given, trailing bytes ignored', (t) => {
  const compressed = Buffer.concat([zlib.deflateRawSync(text), Buffer.alloc(300, 7)]);
  t.true(Buffer.from(decompressCluster('zlib', compressed, CLUSTER)).equals(text));
  const out = Buffer.alloc(CLUSTER);
  t.is(decompressCluster('zlib', compressed, CLUSTER, out), out);
  t.true(out.equals(text));
});

test('a stream cut after the cluster is full is good (the rounded extent may end mid-stream)', (t) => {
  // A stream for two clusters, flushed after the first: its first part yields one cluster.
  const deflate = zlib.createDeflateRaw();
  const parts: Buffer[] = [];
  deflate.on('data', (d: Buffer) => parts.push(d));
  return new Promise<void>((resolve) => {
    deflate.write(text, () => {
      deflate.flush(zlib.constants.Z_SYNC_FLUSH, () => {
        const firstPart = Buffer.concat(parts);
        t.true(Buffer.from(decompressCluster('zlib', firstPart, CLUSTER)).equals(text));
        deflate.close();
        resolve();
      });
    });
  });
});

test('too little, too much and damaged data are DecompressErrors; the next cluster still decodes', (t) => {
  const half = zlib.deflateRawSync(text.subarray(0, CLUSTER / 2));
  t.throws(() => decompressCluster('zlib', half, CLUSTER), { instanceOf: DecompressError, message: /decodes to 32768 bytes, not one cluster/ });
  const double = zlib.deflateRawSync(Buffer.concat([text, text]));
  t.throws(() => decompressCluster('zlib', double, CLUSTER), { instanceOf: DecompressError, message: /more than one cluster/ });
  const damaged = zlib.deflateRawSync(text);
  damaged.fill(0xff, 0, 16);
  t.throws(() => decompressCluster('zlib', damaged, CLUSTER), { instanceOf: DecompressError, message: /damaged/ });
  t.true(Buffer.from(decompressCluster('zlib', zlib.deflateRawSync(text), CLUSTER)).equals(text), 'a good cluster after a damaged one');
  t.throws(() => decompressCluster('zlib', zlib.deflateRawSync(text), CLUSTER, Buffer.alloc(100)), { instanceOf: RangeError });
});

test('the decoded-cluster cache recycles the evicted buffer and keeps nothing for a failed decode', (t) => {
  const cache = new ClusterCache(2, 4);
  const a = cache.fill(0, (into) => into.fill(1));
  const b = cache.fill(4096, (into) => into.fill(2));
  t.is(cache.fill(0, () => t.fail('a hit does not decode')), a, 'a hit');
  const c = cache.fill(8192, (into) => into.fill(3)); // evicts 4096, the least recently used
  t.is(c, b, 'the evicted buffer is reused');
  t.deepEqual([...c], [3, 3, 3, 3]);
  t.is(cache.get(4096), undefined);
  t.throws(() => cache.fill(12288, () => {
    throw new DecompressError('damaged');
  }), { instanceOf: DecompressError });
  t.is(cache.get(12288), undefined, 'a failed decode is not cached');
  t.deepEqual([...cache.fill(12288, (into) => into.fill(4))], [4, 4, 4, 4]);
});
