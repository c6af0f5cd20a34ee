/**
 * qcow2 images served by `tapkit serve --read-only`, checked by qemu's own tools over NBD:
 * `qemu-img compare` against the image file (qemu reading the qcow2 itself), `qemu-io`
 * pattern reads, and block status: `nbdinfo --map` of the export against `qemu-img map`
 * of the image, so zero clusters, zero subclusters, unallocated clusters and the backing
 * file's holes reach an NBD client as qemu sees them.
 */
import test, { type ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { serve } from './helpers/nbd';
import { mixedContent, qemuImg, qemuIo, qemuRaw } from './helpers/qemu-images';
import { must, run } from './helpers/run';
import { tempDir } from './helpers/temp';

interface QemuMapEntry {
  start: number;
  length: number;
  present: boolean;
  zero: boolean;
  data: boolean;
}
interface NbdMapEntry {
  offset: number;
  length: number;
  /** NBD base:allocation flags: 1 hole, 2 zero. */
  type: number;
}

/** Every offset where either map changes, over [0, size). */
function boundaries(size: number, ...maps: Array<Array<{ start: number; length: number }>>): number[] {
  const points = new Set<number>([0, size]);
  for (const map of maps) for (const e of map) points.add(e.start).add(e.start + e.length);
  return [...points].filter((p) => p <= size).sort((a, b) => a - b);
}

function at<T extends { start: number; length: number }>(map: T[], offset: number): T | undefined {
  return map.find((e) => e.start <= offset && offset < e.start + e.length);
}

/**
 * The export's block status agrees with qemu's map of the image: zero exactly where qemu
 * says zero, never a hole where qemu has data, and a hole wherever no layer of the chain
 * has anything (qemu's present: false).
 */
async function assertBlockStatusLikeQemu(t: ExecutionContext, uri: string, image: string, size: number): Promise<NbdMapEntry[]> {
  const qemu = JSON.parse(await must('qemu-img', ['map', '--output=json', image])) as QemuMapEntry[];
  const nbd = JSON.parse(await must('nbdinfo', ['--map', '--json', uri])) as NbdMapEntry[];
  const ours = nbd.map((e) => ({ ...e, start: e.offset }));
  const points = boundaries(size, qemu, ours);
  t.is(points[points.length - 1], size);
  for (let i = 0; i + 1 < points.length; i++) {
    const offset = points[i];
    const q = at(qemu, offset);
    const n = at(ours, offset);
    if (!q || !n) {
      t.fail(`offset ${offset}: ${q ? '' : 'qemu-img map'} ${n ? '' : 'nbdinfo --map'} has no entry`);
      continue;
    }
    const where = `[${offset}, ${points[i + 1]}): qemu ${JSON.stringify(q)}, tapkit type ${n.type}`;
    t.is((n.type & 2) !== 0, q.zero, `zero flag differs at ${where}`);
    if (n.type & 1) t.false(q.data, `hole where qemu has data at ${where}`);
    if (!q.present) t.true((n.type & 1) !== 0, `no hole where nothing is allocated at ${where}`);
  }
  return nbd;
}

/** Serves one image read-only; returns the URI. */
async function serveImage(t: ExecutionContext, spec: string): Promise<string> {
  const dir = tempDir(t, 'tapkit-qcow2-nbd-');
  const server = await serve(t, ['--read-only', '--quiet', '--socket', path.join(dir, 'nbd.sock'), spec]);
  return server.uri;
}

async function assertIdentical(t: ExecutionContext, image: string, uri: string, format = 'qcow2'): Promise<void> {
  const out = await must('qemu-img', ['compare', '-f', format, '-F', 'raw', image, uri], { timeoutMs: 120_000 });
  t.regex(out, /Images are identical/);
}

test('a chain qcow2 ← qcow2 ← sparse raw: compare, qemu-io patterns, block status through every layer', async (t) => {
  const dir = tempDir(t, 'tapkit-qcow2-nbd-');
  const base = path.join(dir, 'base.raw');
  // Data in the first MiB and at 1.5 MiB, a hole between; the base is shorter than the image.
  const fd = fs.openSync(base, 'w');
  fs.writeSync(fd, Buffer.alloc(1024 * 1024, 0xb5), 0, 1024 * 1024, 0);
  fs.writeSync(fd, Buffer.alloc(64 * 1024, 0xb6), 0, 64 * 1024, 1536 * 1024);
  fs.ftruncateSync(fd, 2 * 1024 * 1024);
  fs.closeSync(fd);
  const mid = path.join(dir, 'mid.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'base.raw', '-F', 'raw', mid, '3M']);
  await qemuIo(mid, ['write -P 0x6d 512k 600k', 'write -z 2m 64k', 'write -z 1540k 8k']);
  const top = path.join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top, '4M']);
  await qemuIo(top, ['write -P 0x01 0 64k', 'write -z 128k 64k', 'write -z -u 256k 64k', 'write -P 0x02 3m 64k']);

  const uri = await serveImage(t, top);
  await assertIdentical(t, top, uri);
  const out = await must('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x01 0 64k', '-c', 'read -P 0xb5 64k 64k', '-c', 'read -P 0 128k 64k', '-c', 'read -P 0 256k 64k',
    '-c', 'read -P 0x6d 512k 600k', '-c', 'read -P 0xb6 1548k 52k', '-c', 'read -P 0 1540k 8k', '-c', 'read -P 0 2m 64k', '-c', 'read -P 0x02 3m 64k', '-c', 'read -P 0 3136k 960k', uri]);
  t.notRegex(out, /Pattern verification failed|error/i, out);
  const map = await assertBlockStatusLikeQemu(t, uri, top, 4 * 1024 * 1024);
  t.true(map.some((e) => e.type === 2), 'zero clusters reach the client as zero');
  t.true(map.some((e) => e.type === 3), 'unallocated stretches with nothing below reach the client as holes');
});

test('extended L2 subclusters over a raw backing file: block status at subcluster granularity', async (t) => {
  const dir = tempDir(t, 'tapkit-qcow2-nbd-');
  const base = path.join(dir, 'base.raw');
  fs.writeFileSync(base, Buffer.alloc(1024 * 1024, 0x5b));
  fs.truncateSync(base, 2 * 1024 * 1024);
  const image = path.join(dir, 'ext.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-b', 'base.raw', '-F', 'raw', image, '2M']);
  await qemuIo(image, ['write -P 0x01 2k 2k', 'write -z 8k 4k', 'write -P 0x03 130k 1k', 'write -z -u 1m 64k', 'write -z 1100k 2k', 'write -P 0x04 1200k 6k']);
  const uri = await serveImage(t, image);
  await assertIdentical(t, image, uri);
  const map = await assertBlockStatusLikeQemu(t, uri, image, 2 * 1024 * 1024);
  t.true(map.some((e) => e.type === 2 && e.length < 64 * 1024), 'a zero run shorter than a cluster: subcluster granularity');
});

test('zstd-compressed clusters with holes: compare and block status', async (t) => {
  const dir = tempDir(t, 'tapkit-qcow2-nbd-');
  const src = path.join(dir, 'src.raw');
  const content = Buffer.alloc(6 * 1024 * 1024);
  mixedContent(2 * 1024 * 1024, 9).copy(content, 1024 * 1024);
  fs.writeFileSync(src, content);
  const image = path.join(dir, 'c.qcow2');
  await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=16k,compression_type=zstd', src, image]);
  const uri = await serveImage(t, image);
  await assertIdentical(t, image, uri);
  const map = await assertBlockStatusLikeQemu(t, uri, image, content.length);
  t.is(map[0].type, 3, 'the unwritten first MiB is a hole');
});

test('an internal snapshot served by name reads as qemu reads the snapshot', async (t) => {
  const dir = tempDir(t, 'tapkit-qcow2-nbd-');
  const image = path.join(dir, 'snap.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', image, '2M']);
  await qemuIo(image, ['write -P 0x0a 0 1m']);
  await qemuImg(['snapshot', '-c', 'golden', image]);
  await qemuIo(image, ['write -P 0x0b 256k 1m']);
  const reference = path.join(dir, 'golden.raw');
  fs.writeFileSync(reference, await qemuRaw(image, ['-l', 'snapshot.name=golden']));
  const uri = await serveImage(t, `qcow2,snapshot=golden:${image}`);
  await assertIdentical(t, reference, uri, 'raw');
  // The active layer differs from the snapshot: compare says so.
  const differ = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', image, uri], { timeoutMs: 60_000 });
  t.is(differ.code, 1, differ.stdout + differ.stderr);
});
