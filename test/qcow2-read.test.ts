/**
 * qcow2 images made by qemu-img and qemu-io read byte for byte as `qemu-img convert -O raw`
 * gives them: versions 2 and 3, every cluster size, compressed clusters (zlib, zstd), zero
 * clusters, extended L2 subclusters, backing chains mixing raw and qcow2, internal
 * snapshots, dirty lazy-refcount images, external data files. Extents stay consistent.
 */
import test, { type ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockError, Vbd, type Extent } from '../core';
import { mixedContent, openVbd, qemuImg, qemuIo, qemuRaw, readAll, writeBytes } from './helpers/qemu-images';
import { run } from './helpers/run';
import { fileTempDir } from './helpers/temp';

function workDir(): string {
  return fileTempDir('tapkit-qcow2-');
}

/** Reads the image through tapkit (whole, then in odd-sized pieces) and compares with qemu's bytes. */
async function assertReadsLikeQemu(t: ExecutionContext, spec: string, reference: Buffer): Promise<Vbd> {
  const vbd = await openVbd(spec);
  t.teardown(() => vbd.close());
  t.is(vbd.info().size, reference.length, 'virtual size');
  const whole = await readAll(vbd);
  t.true(whole.equals(reference), `${spec}: whole-disk read differs from qemu-img convert`);
  const pieces = await readAll(vbd, 77_777);
  t.true(pieces.equals(reference), `${spec}: reads of 77777 bytes differ from qemu-img convert`);
  await assertExtentsConsistent(t, vbd, reference);
  return vbd;
}

/** Extents cover the disk in order; every zero or hole run reads as zeros in qemu's bytes. */
async function assertExtentsConsistent(t: ExecutionContext, vbd: Vbd, reference: Buffer): Promise<Extent[]> {
  const size = vbd.info().size;
  const all: Extent[] = [];
  for (let pos = 0; pos < size; ) {
    const runs = await vbd.extents(pos, size - pos);
    t.true(runs.length > 0 && runs[0].offset === pos, 'extents start where asked');
    for (const r of runs) {
      t.is(r.offset, pos, 'extents have no gaps');
      if (r.type !== 'data') t.true(reference.subarray(r.offset, r.offset + r.length).every((b) => b === 0), `${r.type} run at ${r.offset}+${r.length} is not zeros in qemu's bytes`);
      pos = r.offset + r.length;
      all.push(r);
    }
  }
  return all;
}

const SIZE = '4M';
/** Writes scattered over a 4 MiB disk, crossing cluster and L2 boundaries at every cluster size. */
const WRITES = ['write -P 0x11 0 3k', 'write -P 0x22 700k 130k', 'write -P 0x33 2047k 2k', 'write -P 0x44 3m 512', 'write -P 0x55 4095k 1k'];

for (const compat of ['0.10', '1.1']) {
  for (let bits = 9; bits <= 21; bits++) {
    const clusterSize = 2 ** bits;
    test(`qcow2 v${compat === '0.10' ? 2 : 3}, ${clusterSize}-byte clusters, reads as qemu does`, async (t) => {
      const dir = workDir();
      const image = path.join(dir, 'a.qcow2');
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `compat=${compat},cluster_size=${clusterSize}`, image, SIZE]);
      await qemuIo(image, WRITES);
      const reference = await qemuRaw(image);
      const vbd = await assertReadsLikeQemu(t, `qcow2:${image}`, reference);
      t.is(vbd.top.describe!().version, compat === '0.10' ? 2 : 3);
      t.is(vbd.top.describe!().clusterSize, clusterSize);
    });
  }
}

test('a bare path is probed as qcow2', async (t) => {
  const dir = workDir();
  const image = path.join(dir, 'probe.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', image, '1M']);
  await qemuIo(image, ['write -P 0x61 4k 4k']);
  const vbd = await assertReadsLikeQemu(t, image, await qemuRaw(image));
  t.is(vbd.top.name, 'qcow2');
});

for (const type of ['zlib', 'zstd'] as const) {
  for (const clusterSize of [512, 4096, 65536, 2 * 1024 * 1024]) {
    test(`convert -c with ${type}, ${clusterSize}-byte clusters, reads as qemu does`, async (t) => {
      const dir = workDir();
      const src = path.join(dir, 'src.raw');
      fs.writeFileSync(src, mixedContent(3 * 1024 * 1024 + 4096, clusterSize));
      const image = path.join(dir, 'c.qcow2');
      await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${clusterSize},compression_type=${type}`, src, image]);
      const reference = await qemuRaw(image);
      t.true(reference.equals(fs.readFileSync(src)), 'qemu agrees with the source');
      const vbd = await assertReadsLikeQemu(t, `qcow2:${image}`, reference);
      t.is(vbd.top.describe!().compression, type);
      const check = JSON.parse(await qemuImg(['check', '--output=json', image])) as { 'compressed-clusters'?: number };
      t.true((check['compressed-clusters'] ?? 0) > 0, 'the image really has compressed clusters');
    });
  }
}

test('zero clusters (write -z, with and without unmap) read as zeros and hide the backing file', async (t) => {
  const dir = workDir();
  const base = path.join(dir, 'base.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, SIZE]);
  await qemuIo(base, ['write -P 0x77 0 4M']);
  const top = path.join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
  await qemuIo(top, ['write -P 0x12 0 128k', 'write -z 64k 128k', 'write -z -u 1m 256k', 'write -z 3m 64k']);
  const reference = await qemuRaw(top);
  t.true(reference.subarray(1024 * 1024, 1024 * 1024 + 256 * 1024).every((b) => b === 0), 'qemu reads the zero clusters as zeros');
  const vbd = await assertReadsLikeQemu(t, `qcow2:${top}`, reference);
  const runs = await vbd.extents(1024 * 1024, 256 * 1024);
  t.deepEqual(runs.map((r) => r.type), ['zero'], 'zero clusters are reported as zero extents');
});

test('a v2 image that qemu zeroed reads as zeros', async (t) => {
  const dir = workDir();
  const image = path.join(dir, 'v2.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', image, SIZE]);
  await qemuIo(image, ['write -P 0x21 0 1m', 'write -z 256k 256k']);
  await assertReadsLikeQemu(t, `qcow2:${image}`, await qemuRaw(image));
});

test('extended L2 entries: partly written, zeroed and unallocated subclusters over a backing file', async (t) => {
  const dir = workDir();
  const base = path.join(dir, 'base.raw');
  fs.writeFileSync(base, Buffer.alloc(4 * 1024 * 1024, 0x5b));
  const image = path.join(dir, 'ext.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-b', 'base.raw', '-F', 'raw', image]);
  // Subclusters are 2 KiB: writes of parts of a cluster allocate only some of them.
  await qemuIo(image, ['write -P 0x01 2k 2k', 'write -P 0x02 10k 5k', 'write -z 20k 2k', 'write -P 0x03 130k 1k', 'write -z 1m 64k', 'write -P 0x04 2m 64k']);
  const reference = await qemuRaw(image);
  const vbd = await assertReadsLikeQemu(t, `qcow2:${image}`, reference);
  t.regex(String(vbd.top.describe!().features), /extended L2/);
  const runs = await vbd.extents(0, 64 * 1024);
  t.true(runs.some((r) => r.type === 'zero') && runs.some((r) => r.type === 'data'), 'subcluster extents differ within one cluster');
});

test('a three-deep backing chain mixing raw and qcow2, with a base shorter than the image', async (t) => {
  const dir = workDir();
  const base = path.join(dir, 'base.raw');
  // 1 MiB + 3 bytes: shorter than the layers above, not even sector aligned.
  fs.writeFileSync(base, Buffer.alloc(1024 * 1024 + 3, 0xb5));
  fs.mkdirSync(path.join(dir, 'layers'));
  const mid = path.join(dir, 'layers', 'mid.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', '../base.raw', '-F', 'raw', mid, '3M']);
  await qemuIo(mid, ['write -P 0x6d 512k 600k', 'write -P 0x6e 2m 4k']);
  const top = path.join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=128k', '-b', 'layers/mid.qcow2', '-F', 'qcow2', top, SIZE]);
  await qemuIo(top, ['write -P 0x70 0 64k', 'write -P 0x71 1000k 200k', 'write -P 0x72 3584k 512k']);
  const reference = await qemuRaw(top);
  const vbd = await assertReadsLikeQemu(t, top, reference);
  t.is(vbd.top.backing?.name, 'qcow2', 'mid layer is qcow2');
  t.is(vbd.top.backing?.backing?.name, 'raw', 'base layer is raw');
  const describe = vbd.top.describe!();
  t.is(describe.backing, 'layers/mid.qcow2');
  t.is(describe.backingFormat, 'qcow2');
  // Past the base's end and the middle layer's size, unallocated clusters are holes.
  const tail = await vbd.extents(3 * 1024 * 1024, 512 * 1024);
  t.is(tail[0].type, 'hole');
});

test('a backing file named without a format is probed', async (t) => {
  const dir = workDir();
  const base = path.join(dir, 'base.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '2M']);
  await qemuIo(base, ['write -P 0x31 0 2M']);
  const top = path.join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
  // Hide the backing-format extension (an unknown type is skipped), as old qemu-img left it out.
  const bytes = fs.readFileSync(top);
  const at = bytes.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]), 104);
  t.true(at > 0, 'the backing-format extension is there to hide');
  writeBytes(top, at, Buffer.from([0x7a, 0x7a, 0x7a, 0x7a]));
  await qemuIo(top, ['write -P 0x32 64k 64k']);
  const vbd = await assertReadsLikeQemu(t, top, await qemuRaw(top));
  t.is(vbd.top.describe!().backingFormat, undefined);
  t.is(vbd.top.backing?.name, 'qcow2');
});

test('internal snapshots: the active layer and each snapshot read as qemu reads them', async (t) => {
  const dir = workDir();
  const image = path.join(dir, 'snap.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', image, SIZE]);
  await qemuIo(image, ['write -P 0x01 0 1m']);
  await qemuImg(['snapshot', '-c', 'first', image]);
  await qemuIo(image, ['write -P 0x02 512k 1m', 'write -z 0 64k']);
  await qemuImg(['snapshot', '-c', 'second', image]);
  await qemuIo(image, ['write -P 0x03 3m 128k', 'discard 512k 128k']);
  const active = await qemuRaw(image);
  const vbd = await assertReadsLikeQemu(t, `qcow2:${image}`, active);
  const snapshots = vbd.top.describe!().snapshots as Array<{ name: string }>;
  t.deepEqual(snapshots.map((s) => s.name), ['first', 'second']);
  for (const name of ['first', 'second']) {
    const reference = await qemuRaw(image, ['-l', `snapshot.name=${name}`]);
    t.false(reference.equals(active), `snapshot ${name} differs from the active layer`);
    const snap = await assertReadsLikeQemu(t, `qcow2,snapshot=${name}:${image}`, reference);
    t.is(snap.top.describe!().snapshot, name);
  }
  await t.throwsAsync(openVbd(`qcow2,snapshot=nope:${image}`), { instanceOf: BlockError, message: /no snapshot 'nope'.*first, second/ });
});

test('a dirty image with lazy refcounts (writer killed) is readable and says it is dirty', async (t) => {
  const dir = workDir();
  const image = path.join(dir, 'dirty.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', image, SIZE]);
  // qemu-io dies by SIGKILL before it can clear the dirty bit.
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 1m', '-c', 'write -P 0x5b 2m 64k', '-c', 'sigraise 9', image]);
  const incompatible = fs.readFileSync(image).readBigUInt64BE(72);
  t.is(incompatible & 1n, 1n, 'the dirty bit is set');
  const vbd = await assertReadsLikeQemu(t, `qcow2:${image}`, await qemuRaw(image));
  t.regex(String(vbd.top.describe!().dirty), /^yes \(lazy refcounts/);
  t.regex(String(vbd.top.describe!().features), /dirty.*lazy refcounts/);
});

test('an external data file (data_file=, and data_file_raw=on) reads as qemu does', async (t) => {
  const dir = workDir();
  for (const raw of ['off', 'on']) {
    const data = path.join(dir, `data-${raw}.raw`);
    const image = path.join(dir, `ext-${raw}.qcow2`);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${data},data_file_raw=${raw}`, image, SIZE]);
    await qemuIo(image, ['write -P 0x0d 0 64k', 'write -P 0x0e 1m 300k', 'write -z 1100k 64k']);
    const vbd = await assertReadsLikeQemu(t, `qcow2:${image}`, await qemuRaw(image));
    t.is(vbd.top.describe!().dataFile, data);
  }
});

test('writes are refused with EROFS', async (t) => {
  const dir = workDir();
  const image = path.join(dir, 'ro.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', image, '1M']);
  const vbd = await openVbd(`qcow2:${image}`);
  t.teardown(() => vbd.close());
  t.false(vbd.capabilities().write);
  t.true(vbd.info().readOnly);
  await t.throwsAsync(vbd.write(Buffer.alloc(512), 0), { instanceOf: BlockError, message: /.+/ }).then((e) => t.is((e as BlockError).code, 'EROFS'));
  await t.throwsAsync(vbd.zero(0, 512)).then((e) => t.is((e as BlockError).code, 'EROFS'));
});

test('concurrent small reads over compressed clusters agree with qemu', async (t) => {
  const dir = workDir();
  const src = path.join(dir, 'src.raw');
  fs.writeFileSync(src, mixedContent(2 * 1024 * 1024, 7));
  const image = path.join(dir, 'c.qcow2');
  await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', src, image]);
  const reference = fs.readFileSync(src);
  const vbd = await openVbd(`qcow2,l2-cache-size=64k:${image}`);
  t.teardown(() => vbd.close());
  let x = 12345;
  const reads = Array.from({ length: 400 }, () => {
    x = (x * 1103515245 + 12345) & 0x7fffffff;
    const offset = x % (reference.length - 9000);
    const length = 1 + (x % 9000);
    return { offset, length };
  });
  const results = await Promise.all(
    reads.map(async ({ offset, length }) => {
      const buf = Buffer.alloc(length);
      await vbd.read(buf, offset);
      return buf.equals(reference.subarray(offset, offset + length));
    }),
  );
  t.true(results.every(Boolean));
});

test('persistent bitmaps and unknown compatible or autoclear bits do not stop a reader', async (t) => {
  const dir = workDir();
  const image = path.join(dir, 'bitmaps.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', image, SIZE]);
  await qemuImg(['bitmap', '--add', image, 'backup-0']);
  await qemuImg(['bitmap', '--add', image, 'backup-1']);
  await qemuIo(image, ['write -P 0x3c 64k 192k']);
  // A bitmap left "in use" by a writer that was killed.
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x3d 1m 64k', '-c', 'sigraise 9', image]);
  const vbd = await assertReadsLikeQemu(t, `qcow2:${image}`, await qemuRaw(image));
  t.is(vbd.top.describe!().bitmaps, 2);
  t.regex(String(vbd.top.describe!().features), /bitmaps/);

  // Feature bits a reader may ignore (compatible bit 9, autoclear bit 13): read as qemu reads them.
  const odd = path.join(dir, 'odd-bits.qcow2');
  fs.copyFileSync(image, odd);
  const compat = Buffer.alloc(8);
  compat.writeBigUInt64BE(fs.readFileSync(odd).readBigUInt64BE(80) | (1n << 9n));
  writeBytes(odd, 80, compat);
  const autoclear = Buffer.alloc(8);
  autoclear.writeBigUInt64BE(fs.readFileSync(odd).readBigUInt64BE(88) | (1n << 13n));
  writeBytes(odd, 88, autoclear);
  await assertReadsLikeQemu(t, `qcow2:${odd}`, await qemuRaw(odd));
});
