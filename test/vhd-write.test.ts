/**
 * Images tapkit writes read the same through the real peers: a random write stream (odd
 * sizes and offsets, zeros, trims), then flush and close; the disk then reads as the model
 * through `qemu-img convert`/`qemu-img compare` and through 7-Zip, and `qemu-img check`
 * finds it clean. Differencing chains tapkit makes and writes read as the model through
 * 7-Zip, which follows parents and sector bitmaps (qemu ignores both). A qcow2 child made by
 * qemu-img over a VHD parent (`-F vpc -b`) reads the same through tapkit as through qemu.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Vbd } from '../core/vbd';
import { createImage } from '../providers/vhd/create';
import { snapshotOpenVhd, snapshotVhd } from '../providers/vhd/snapshot';
import { VhdProvider } from '../providers/vhd/provider';
import { checkImage } from '../providers/vhd/check';
import { firstDifference, openSpec, prng, qemuRaw, randomBytesFrom, sevenZipRaw, tapkitRaw } from './helpers/vhd';
import { must } from './helpers/run';
import { fileTempDir } from './helpers/temp';

const dir = fileTempDir('tapkit-vhd-write-');
const MiB = 2 ** 20;

/** Applies a random stream of writes, zeros and trims to the disk and to the model. */
async function randomStream(vbd: Vbd, model: Buffer, seed: number, count: number): Promise<void> {
  const next = prng(seed);
  const size = model.length;
  for (let i = 0; i < count; i++) {
    const kind = next();
    // Mostly small and unaligned, sometimes several blocks long.
    const len = next() < 0.15 ? Math.floor(next() * 5 * MiB) + 1 : Math.floor(next() * 70_000) + 1;
    const at = Math.floor(next() * (size - len));
    if (kind < 0.75) {
      const data = randomBytesFrom(next, len);
      await vbd.write(data, at, { fua: next() < 0.05 });
      data.copy(model, at);
    } else if (kind < 0.9) {
      await vbd.zero(at, len, { mayTrim: next() < 0.5 });
      model.fill(0, at, at + len);
    } else {
      // Trim may free or keep: each byte afterwards reads as before or as zero.
      await vbd.trim(at, len, {});
      const after = Buffer.alloc(len);
      await vbd.read(after, at);
      for (let k = 0; k < len; k++) {
        if (after[k] !== 0 && after[k] !== model[at + k]) throw new Error(`trim at ${at}+${len}: byte ${at + k} reads ${after[k]}, neither ${model[at + k]} nor 0`);
      }
      after.copy(model, at);
    }
    if (next() < 0.1) await vbd.flush();
  }
  await vbd.flush();
}

async function writeWithTapkit(spec: string, model: Buffer, seed: number, count = 60): Promise<void> {
  const p = await openSpec(spec, false);
  const vbd = new Vbd(p);
  try {
    await randomStream(vbd, model, seed, count);
  } finally {
    await vbd.close();
  }
}

async function qemuCheckClean(t: import('ava').ExecutionContext, image: string): Promise<void> {
  const out = await must('qemu-img', ['check', '-f', 'vpc', image]).catch((e: Error) => e.message);
  // qemu's vpc driver has no check routine: it says so and exits 0 only for a readable image.
  t.notRegex(out, /error|corrupt|leak/i, `qemu-img check ${image}: ${out}`);
  const info = JSON.parse(await must('qemu-img', ['info', '--output=json', '-f', 'vpc', image]));
  t.is(info.format, 'vpc');
}

async function sameAsModel(t: import('ava').ExecutionContext, image: string, model: Buffer, peers: Array<'qemu' | '7zz'>): Promise<void> {
  t.is(firstDifference(await tapkitRaw(`vhd:${image}`), model), -1, 'tapkit reads the model back');
  if (peers.includes('qemu')) {
    t.is(firstDifference(await qemuRaw(image, dir), model), -1, 'qemu-img convert gives the model');
    const modelFile = path.join(dir, `${path.basename(image)}.model`);
    fs.writeFileSync(modelFile, model);
    await must('qemu-img', ['compare', '-f', 'vpc', '-F', 'raw', image, modelFile]);
    fs.rmSync(modelFile);
  }
  if (peers.includes('7zz')) t.is(firstDifference(await sevenZipRaw(image, dir), model), -1, '7-Zip extracts the model');
  const report = await checkImage(image);
  t.deepEqual(report.problems, [], 'tapkit vhd check finds nothing');
}

for (const c of [
  { name: 'dynamic, 2 MiB blocks', size: 24 * MiB, type: 'dynamic' as const, blockSize: 2 * MiB },
  { name: 'dynamic, 512 KiB blocks, size not a whole number of blocks', size: 13 * MiB + 7 * 512, type: 'dynamic' as const, blockSize: 512 * 1024 },
  { name: 'fixed', size: 9 * MiB + 512, type: 'fixed' as const },
]) {
  test(`tapkit writes a ${c.name} image that qemu-img and 7-Zip read as written`, async (t) => {
    const image = path.join(dir, `${c.type}-${c.size}.vhd`);
    const size = createImage(image, { size: c.size, type: c.type, blockSize: c.blockSize });
    const model = Buffer.alloc(size);
    await writeWithTapkit(`vhd:${image}`, model, c.size);
    await qemuCheckClean(t, image);
    await sameAsModel(t, image, model, ['qemu', '7zz']);
  });
}

test('tapkit writes into an image qemu-img made and qemu-io filled; qemu reads the result as written', async (t) => {
  const image = path.join(dir, 'qemu-made.vhd');
  await must('qemu-img', ['create', '-q', '-f', 'vpc', image, '16M']);
  await must('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x41 0 3M', '-c', 'write -P 0x42 9M 100k', image]);
  const model = await qemuRaw(image, dir);
  await writeWithTapkit(`vhd:${image}`, model, 77);
  await qemuCheckClean(t, image);
  // qemu sets every bitmap bit of the blocks it allocates; the data there is what counts.
  await sameAsModel(t, image, model, ['qemu', '7zz']);
});

test('a differencing chain tapkit makes and writes reads as the model through 7-Zip, sector by sector', async (t) => {
  const base = path.join(dir, 'chain-base.vhd');
  await must('qemu-img', ['create', '-q', '-f', 'vpc', '-o', 'subformat=dynamic', base, '12M']);
  await must('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x61 0 5M', '-c', 'write -P 0x62 7M 3M', base]);
  const model = await qemuRaw(base, dir);
  const mid = path.join(dir, 'chain-mid.vhd');
  const top = path.join(dir, 'chain-top.vhd');
  const made = await snapshotVhd(base, mid);
  t.is(made.child, mid);
  await writeWithTapkit(`vhd:${mid}`, model, 5, 40);
  await snapshotVhd(mid, top, { blockSize: 512 * 1024 });
  await writeWithTapkit(`vhd:${top}`, model, 6, 40);
  // Sector-sized writes and zeros over the parent's data: the bitmap decides per sector.
  const p = await openSpec(`vhd:${top}`, false);
  const vbd = new Vbd(p);
  for (let k = 0; k < 8; k++) {
    const at = 3 * MiB + k * 1536 + 512;
    const data = Buffer.alloc(512, 0x70 + k);
    await vbd.write(data, at, {});
    data.copy(model, at);
  }
  await vbd.zero(8 * MiB + 512, 1024, {});
  model.fill(0, 8 * MiB + 512, 8 * MiB + 1536);
  await vbd.close();
  // Each layer on its own is a well-formed image for qemu (which reads a child as dynamic).
  for (const layer of [base, mid, top]) await qemuCheckClean(t, layer);
  await sameAsModel(t, top, model, ['7zz']);
  const chain = await openSpec(`vhd:${top}`);
  t.truthy(chain.backing, 'the top image opened its parent');
  t.truthy(chain.backing!.backing, 'and the grandparent');
  t.is((chain.backing as VhdProvider).location, mid);
  await chain.close();
});

test('zero in a child hides the parent and copies nothing else; a child write copies only the sectors written', async (t) => {
  const base = path.join(dir, 'hide-base.vhd');
  await must('qemu-img', ['create', '-q', '-f', 'vpc', base, '4M']);
  await must('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x55 0 4M', base]);
  const child = path.join(dir, 'hide-child.vhd');
  await snapshotVhd(base, child);
  const before = fs.statSync(child).size;
  const p = await openSpec(`vhd:${child}`, false);
  const vbd = new Vbd(p);
  await vbd.zero(MiB, 4096, {});
  await vbd.write(Buffer.alloc(100, 0x99), 3 * MiB + 10, {});
  await vbd.flush();
  const ext = await vbd.extents(0, 4 * MiB);
  await vbd.close();
  // Two blocks allocated (bitmap + 2 MiB of data area each, sparse), no more.
  t.is(fs.statSync(child).size, before + 2 * (512 + 2 * MiB));
  // qemu-img rounded 4M up to a CHS size: the disk is a little larger than 4 MiB.
  const model = await qemuRaw(base, dir);
  t.true(model.subarray(0, 4 * MiB).every((b) => b === 0x55));
  model.fill(0, MiB, MiB + 4096);
  model.fill(0x99, 3 * MiB + 10, 3 * MiB + 110);
  await sameAsModel(t, child, model, ['7zz']);
  // The child holds only the 4 KiB of zeros and the one sector written into: its own data
  // area is sparse, so the file's allocated bytes stay far below a block.
  const allocated = Number(JSON.parse(await must('qemu-img', ['info', '--output=json', child]))['actual-size']);
  t.true(allocated < before + MiB, `child allocates ${allocated} bytes`);
  t.true(ext.length > 0);
});

test('qemu-img makes a qcow2 child over a tapkit-written VHD (-F vpc -b): tapkit reads the chain as qemu does', async (t) => {
  const base = path.join(dir, 'q-base.vhd');
  const size = createImage(base, { size: 8 * MiB, type: 'dynamic' });
  const model = Buffer.alloc(size);
  await writeWithTapkit(`vhd:${base}`, model, 9, 30);
  const top = path.join(dir, 'q-top.qcow2');
  await must('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'vpc', '-b', path.basename(base), top]);
  await must('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x3c 1M 70k', top]);
  model.fill(0x3c, MiB, MiB + 70 * 1024);
  const qemu = await qemuRaw(top, dir, 'qcow2');
  const ours = await tapkitRaw(top);
  t.is(firstDifference(ours, qemu), -1);
  t.is(firstDifference(ours, model), -1);
});

test('snapshotOpenVhd on a live image: unflushed writes reach the parent first, the child then reads them', async (t) => {
  const base = path.join(dir, 'live.vhd');
  const size = createImage(base, { size: 6 * MiB, type: 'dynamic' });
  const live = (await openSpec(`vhd:${base}`, false)) as VhdProvider;
  const model = Buffer.alloc(size);
  // Allocating writes whose BAT entries are still only in memory.
  for (const [at, len, byte] of [[100, 5000, 0x81], [3 * MiB, 2 * MiB, 0x82]] as const) {
    await live.write(Buffer.alloc(len, byte), at, {});
    model.fill(byte, at, at + len);
  }
  const child = path.join(dir, 'live-child.vhd');
  const made = await snapshotOpenVhd(live, child);
  t.is(made.parent, base);
  // The daemon stops writing to the parent here and reopens the device on the child.
  const top = await openSpec(`vhd:${child}`, false);
  await top.write!(Buffer.alloc(512, 0x83), 0, {});
  model.fill(0x83, 0, 512);
  await top.close();
  await live.close();
  await sameAsModel(t, child, model, ['7zz']);
  t.is(firstDifference(await qemuRaw(base, dir), model.fill(0x81, 0, 512).fill(0, 0, 100)), -1, 'the parent holds what was written before the snapshot');
});
