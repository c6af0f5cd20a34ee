/**
 * Images made by qemu-img (`create -f vpc`, `convert -O vpc`; fixed and dynamic; force_size
 * on and off; sizes that are not a whole number of blocks) read through tapkit byte for
 * byte as `qemu-img convert -O raw` gives them.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { firstDifference, openSpec, prng, qemuRaw, randomBytesFrom, tapkitRaw } from './helpers/vhd';
import { must } from './helpers/run';
import { fileTempDir } from './helpers/temp';

const dir = fileTempDir('tapkit-vhd-read-');

/** A raw file with random data in scattered places and zeros elsewhere (so conversion stays sparse). */
function patchyRaw(name: string, size: number, seed: number): string {
  const file = path.join(dir, name);
  const next = prng(seed);
  const fd = fs.openSync(file, 'w');
  fs.ftruncateSync(fd, size);
  for (let i = 0; i < 12; i++) {
    const len = Math.floor(next() * 300_000) + 1;
    const at = Math.floor(next() * Math.max(1, size - len));
    fs.writeSync(fd, randomBytesFrom(next, len), 0, len, at);
  }
  fs.closeSync(fd);
  return file;
}

const cases: Array<{ name: string; size: number; options: string }> = [
  { name: 'dynamic', size: 10 * 2 ** 20, options: 'subformat=dynamic' },
  { name: 'dynamic, size not a whole number of blocks', size: 5 * 2 ** 20 + 3 * 512, options: 'subformat=dynamic' },
  { name: 'dynamic, force_size', size: 7 * 2 ** 20 + 512, options: 'subformat=dynamic,force_size=on' },
  { name: 'fixed', size: 6 * 2 ** 20, options: 'subformat=fixed' },
  { name: 'fixed, force_size', size: 3 * 2 ** 20 + 1536, options: 'subformat=fixed,force_size=on' },
];

for (const [index, c] of cases.entries()) {
  test(`qemu-img convert -O vpc (${c.name}) reads as qemu reads it`, async (t) => {
    const raw = patchyRaw(`src${index}.raw`, c.size, index + 1);
    const image = path.join(dir, `conv${index}.vhd`);
    await must('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', c.options, raw, image]);
    const expected = await qemuRaw(image, dir);
    const actual = await tapkitRaw(`vhd:${image}`);
    t.is(actual.length, expected.length, 'size');
    t.is(firstDifference(actual, expected), -1);
    // The format is found by probing too.
    const probed = await openSpec(image);
    t.is(probed.name, 'vhd');
    await probed.close();
  });
}

test('qemu-img create -f vpc with writes by qemu-io reads as qemu reads it (several block sizes of data)', async (t) => {
  const image = path.join(dir, 'created.vhd');
  await must('qemu-img', ['create', '-q', '-f', 'vpc', image, '20M']);
  await must('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x5a 1M 300k', '-c', 'write -P 0xa5 3000k 2M', '-c', 'write -P 0x11 19M 512', image]);
  const expected = await qemuRaw(image, dir);
  const actual = await tapkitRaw(`vhd:${image}`);
  t.is(actual.length, expected.length);
  t.is(firstDifference(actual, expected), -1);
});

test('a 100 GiB sparse dynamic image with a few written blocks: same bytes, holes where qemu wrote nothing', async (t) => {
  const image = path.join(dir, 'big.vhd');
  await must('qemu-img', ['create', '-q', '-f', 'vpc', image, '100G']);
  const writes: Array<[number, number, number]> = [
    [0, 65536, 0x31],
    [37 * 2 ** 30 + 12345 * 512, 3 * 2 ** 20, 0x32],
    [99 * 2 ** 30, 4096, 0x33],
  ];
  await must('qemu-io', ['-f', 'vpc', ...writes.flatMap(([at, len, p]) => ['-c', `write -P ${p} ${at} ${len}`]), image]);
  const qemuSize = Number(JSON.parse(await must('qemu-img', ['info', '--output=json', image]))['virtual-size']);
  const p = await openSpec(`vhd:${image}`);
  t.teardown(() => p.close());
  t.is(p.info().size, qemuSize);
  // Every written range reads back, and the extents say data exactly where blocks were allocated.
  for (const [at, len, pattern] of writes) {
    const buf = Buffer.alloc(len);
    await p.read(buf, at);
    t.true(buf.every((b) => b === pattern), `pattern at ${at}`);
    const qemuBytes = await must('qemu-io', ['-f', 'vpc', '-r', '-c', `read -v ${at} 512`, image]);
    t.regex(qemuBytes, new RegExp(`${pattern.toString(16).padStart(2, '0')} ${pattern.toString(16).padStart(2, '0')}`));
  }
  let cursor = 0;
  let dataBytes = 0;
  const blockSize = 2 ** 21;
  while (cursor < qemuSize) {
    const runs = await p.extents!(cursor, qemuSize - cursor);
    for (const run of runs) {
      if (run.type === 'data') {
        dataBytes += run.length;
        t.true(writes.some(([at, len]) => run.offset < Math.ceil((at + len) / blockSize) * blockSize && Math.floor(at / blockSize) * blockSize < run.offset + run.length), `data extent at ${run.offset} covers a written block`);
      }
      cursor = run.offset + run.length;
    }
  }
  t.is(dataBytes, 4 * blockSize, 'four allocated blocks (one write spans two)');
  // Unwritten space reads as zeros, as in qemu.
  const gap = Buffer.alloc(1 << 20, 1);
  await p.read(gap, 50 * 2 ** 30);
  t.true(gap.every((b) => b === 0));
});
