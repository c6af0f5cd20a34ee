/**
 * `tapkit vhd ...` through the CLI: create, snapshot, info, check, coalesce and resize,
 * with the results judged by qemu-img, libvhdi (vhdiinfo) and 7-Zip.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { firstDifference, openSpec, qemuRaw, sevenZipRaw, tapkitRaw } from './helpers/vhd';
import { must, tapkit } from './helpers/run';
import { fileTempDir } from './helpers/temp';

const dir = fileTempDir('tapkit-vhd-cli-');
const MiB = 2 ** 20;
const GiB = 2 ** 30;
let n = 0;
const fresh = (name: string) => path.join(dir, `${n++}-${name}`);

/** qemu-img info, told the format: qemu's probe takes a fixed VHD for raw (it looks for the footer at offset 0 only). */
async function qemuInfo(image: string): Promise<Record<string, unknown>> {
  return JSON.parse(await must('qemu-img', ['info', '--output=json', '-f', 'vpc', image]));
}

function footerOf(image: string): Buffer {
  const size = fs.statSync(image).size;
  const fd = fs.openSync(image, 'r');
  const b = Buffer.alloc(512);
  fs.readSync(fd, b, 0, 512, size - 512);
  fs.closeSync(fd);
  return b;
}

test('create: dynamic and fixed images that qemu-img and libvhdi open, at the size asked for', async (t) => {
  for (const [type, size] of [['dynamic', 10 * MiB + 512], ['fixed', 3 * MiB]] as const) {
    const image = fresh(`${type}.vhd`);
    const r = await tapkit(['vhd', 'create', image, '--size', String(size), '--type', type]);
    t.is(r.code, 0, r.stderr);
    t.regex(r.stdout, new RegExp(`created ${type} VHD`));
    const info = await qemuInfo(image);
    t.is(info.format, 'vpc');
    t.is(info['virtual-size'], size, `${type}: qemu uses the current size (creator 'win ')`);
    const libvhdi = await must('vhdiinfo', [image]);
    t.regex(libvhdi, new RegExp(`Media size\\s*:.*\\(${size} bytes\\)`), libvhdi);
    t.regex(libvhdi, type === 'dynamic' ? /Disk type\s*:\s*Dynamic/ : /Disk type\s*:\s*Fixed/, libvhdi);
    t.is(firstDifference(await qemuRaw(image, dir), Buffer.alloc(size)), -1, 'reads as zeros');
  }
});

test('create: the geometry follows the spec rule (the same CHS qemu-img computes for its sizes)', async (t) => {
  // qemu-img rounds these requests up to the size its CHS covers: tapkit given that size must store the same CHS.
  for (const request of ['4M', '100M', '1G', '60G']) {
    const q = fresh(`q${request}.vhd`);
    await must('qemu-img', ['create', '-q', '-f', 'vpc', q, request]);
    const size = Number((await qemuInfo(q))['virtual-size']);
    const ours = fresh(`t${request}.vhd`);
    t.is((await tapkit(['vhd', 'create', ours, '--size', String(size)])).code, 0);
    t.deepEqual(footerOf(ours).subarray(56, 60), footerOf(q).subarray(56, 60), `CHS for ${size}`);
  }
});

test('create: the 2040 GiB limit, an existing file, bad options', async (t) => {
  const max = fresh('max.vhd');
  const r = await tapkit(['vhd', 'create', max, '--size', '2040G']);
  t.is(r.code, 0, r.stderr);
  t.is((await qemuInfo(max))['virtual-size'], 2040 * GiB);
  t.regex(await must('vhdiinfo', [max]), /Media size/);
  const over = await tapkit(['vhd', 'create', fresh('over.vhd'), '--size', '2041G']);
  t.is(over.code, 1);
  t.regex(over.stderr, /at most 2040 GiB/);
  const exists = await tapkit(['vhd', 'create', max, '--size', '1M']);
  t.is(exists.code, 1);
  t.regex(exists.stderr, /already exists/);
  t.is((await qemuInfo(max))['virtual-size'], 2040 * GiB, 'left alone');
  const type = await tapkit(['vhd', 'create', fresh('t.vhd'), '--size', '1M', '--type', 'sparse']);
  t.is(type.code, 2);
  t.regex(type.stderr, /--type must be fixed or dynamic/);
  const bs = await tapkit(['vhd', 'create', fresh('bs.vhd'), '--size', '1M', '--block-size', '3M']);
  t.is(bs.code, 1);
  t.regex(bs.stderr, /power of two/);
  t.false(fs.existsSync(path.join(dir, 'bs.vhd')));
});

test('snapshot, info, check: a chain through the CLI; 7-Zip reads the child', async (t) => {
  const parent = fresh('base.vhd');
  await must('qemu-img', ['create', '-q', '-f', 'vpc', parent, '6M']);
  await must('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x66 0 6M', parent]);
  const child = fresh('snap.vhd');
  const r = await tapkit(['vhd', 'snapshot', child, '--parent', parent]);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stdout, /created differencing VHD/);
  const again = await tapkit(['vhd', 'snapshot', child, '--parent', parent]);
  t.is(again.code, 1, 'never overwrites');
  // Write into the child through tapkit's own convert-free path: qemu-io cannot (it ignores parents).
  const p = await openSpec(`vhd:${child}`, false);
  await p.write!(Buffer.alloc(1000, 0x67), 2 * MiB + 100, {});
  await p.close();
  const expected = await qemuRaw(parent, dir);
  expected.fill(0x67, 2 * MiB + 100, 2 * MiB + 1100);
  t.is(firstDifference(await sevenZipRaw(child, dir), expected), -1);

  const json = await tapkit(['vhd', 'info', child, '--json']);
  t.is(json.code, 0, json.stderr);
  const info = JSON.parse(json.stdout);
  t.is(info.image.type, 'differencing');
  t.is(info.image.allocatedBlocks, 1);
  t.deepEqual(info.image.parentLocators, ['W2ru', 'W2ku', 'MacX']);
  t.is(info.parents.length, 1);
  t.is(info.parents[0].location, parent);
  t.is(info.parents[0].uniqueId, info.image.parentUniqueId);
  t.is(info.parents[0].creator, 'qemu 5.3 (Wi2k)');
  const text = await tapkit(['vhd', 'info', child]);
  t.is(text.code, 0);
  t.regex(text.stdout, /type\s+differencing/);
  t.regex(text.stdout, /parent: /);

  const clean = await tapkit(['vhd', 'check', child]);
  t.is(clean.code, 0, clean.stdout + clean.stderr);
  t.regex(clean.stdout, /no problems found/);
});

test('check: lists every problem and exits 1; a missing parent is one of them', async (t) => {
  const image = fresh('bad.vhd');
  await must('qemu-img', ['create', '-q', '-f', 'vpc', image, '6M']);
  await must('qemu-io', ['-f', 'vpc', '-c', 'write -P 1 0 6M', image]);
  const fd = fs.openSync(image, 'r+');
  // BAT entry 0 into the header, entry 2 far past the end, and a damaged footer copy.
  fs.writeSync(fd, Buffer.from([0, 0, 0, 1]), 0, 4, 1536);
  fs.writeSync(fd, Buffer.from([0, 9, 0, 0]), 0, 4, 1536 + 8);
  fs.writeSync(fd, Buffer.from('broken!!'), 0, 8, 0);
  fs.closeSync(fd);
  const r = await tapkit(['vhd', 'check', image]);
  t.is(r.code, 1);
  t.regex(r.stdout, /bat\[0\]: .*inside the image's metadata/);
  t.regex(r.stdout, /bat\[2\]: .*past the end of the file/);
  t.regex(r.stdout, /footer copy: /);
  t.regex(r.stdout, /3 problem\(s\)/);

  const parent = fresh('p.vhd');
  t.is((await tapkit(['vhd', 'create', parent, '--size', '2M'])).code, 0);
  const child = fresh('orphan.vhd');
  t.is((await tapkit(['vhd', 'snapshot', child, '--parent', parent])).code, 0);
  fs.rmSync(parent);
  const orphan = await tapkit(['vhd', 'check', child]);
  t.is(orphan.code, 1);
  t.regex(orphan.stdout, /parent: .*parent not found/);
});

test('coalesce: the child is merged into its parent; the parent then reads as the chain did', async (t) => {
  const parent = fresh('cp.vhd');
  await must('qemu-img', ['create', '-q', '-f', 'vpc', parent, '5M']);
  await must('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x10 0 3M', parent]);
  const child = fresh('cc.vhd');
  t.is((await tapkit(['vhd', 'snapshot', child, '--parent', parent])).code, 0);
  const p = await openSpec(`vhd:${child}`, false);
  await p.write!(Buffer.alloc(3000, 0x20), 2 * MiB - 1000, {});
  await p.zero!(512, 4096, {});
  await p.write!(Buffer.alloc(512, 0x30), 4 * MiB, {});
  await p.close();
  const chain = await tapkitRaw(`vhd:${child}`);
  const r = await tapkit(['vhd', 'coalesce', child]);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stdout, /merged .* into /);
  t.is(firstDifference(await qemuRaw(parent, dir), chain), -1, 'qemu reads the merged parent as the chain');
  t.is(firstDifference(await tapkitRaw(`vhd:${child}`), chain), -1, 'the child over the merged parent still reads the same');
  // Running it again (as after an interruption) changes nothing.
  t.is((await tapkit(['vhd', 'coalesce', child])).code, 0);
  t.is(firstDifference(await qemuRaw(parent, dir), chain), -1);
  t.is((await tapkit(['vhd', 'check', parent])).code, 0);
  const notChild = await tapkit(['vhd', 'coalesce', parent]);
  t.is(notChild.code, 1);
  t.regex(notChild.stderr, /not a differencing VHD/);
});

test('resize: grow dynamic (within the BAT and past it) and fixed images; data kept; shrink refused', async (t) => {
  const dyn = fresh('grow.vhd');
  t.is((await tapkit(['vhd', 'create', dyn, '--size', '3M', '--block-size', '1M'])).code, 0);
  const p = await openSpec(`vhd:${dyn}`, false);
  await p.write!(Buffer.alloc(3 * MiB, 0x44), 0, {});
  await p.close();
  for (const size of [3 * MiB + 512, 200 * MiB]) {
    const r = await tapkit(['vhd', 'resize', dyn, '--size', String(size)]);
    t.is(r.code, 0, r.stderr);
    t.is((await qemuInfo(dyn))['virtual-size'], size);
    const data = await qemuRaw(dyn, dir);
    t.true(data.subarray(0, 3 * MiB).every((b) => b === 0x44), 'old data kept');
    t.true(data.subarray(3 * MiB).every((b) => b === 0), 'new space reads as zeros');
    t.is((await tapkit(['vhd', 'check', dyn])).code, 0);
    t.regex(await must('vhdiinfo', [dyn]), new RegExp(`\\(${size} bytes\\)`));
  }
  // The grown image takes writes at its new end.
  const w = await openSpec(`vhd:${dyn}`, false);
  await w.write!(Buffer.alloc(4096, 0x45), 200 * MiB - 4096, {});
  await w.close();
  t.is((await tapkit(['vhd', 'check', dyn])).code, 0);
  t.true((await qemuRaw(dyn, dir)).subarray(200 * MiB - 4096).every((b) => b === 0x45));

  const fixed = fresh('growfixed.vhd');
  await must('qemu-img', ['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed,force_size=on', fixed, '2M']);
  await must('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x46 0 2M', fixed]);
  t.is((await tapkit(['vhd', 'resize', fixed, '--size', '5M'])).code, 0);
  const grown = await qemuRaw(fixed, dir);
  t.is(grown.length, 5 * MiB);
  t.true(grown.subarray(0, 2 * MiB).every((b) => b === 0x46));
  t.true(grown.subarray(2 * MiB).every((b) => b === 0), 'the old footer is gone from the disk');

  const shrink = await tapkit(['vhd', 'resize', fixed, '--size', '1M']);
  t.is(shrink.code, 1);
  t.regex(shrink.stderr, /shrinking is not supported/);
});
