/**
 * `tapkit ctl snapshot`: a live VHD snapshot through a real daemon, the images made by
 * qemu-img and the result read back by qemu-img (the parent: qemu's vpc driver has no
 * differencing support), 7-Zip (the whole chain) and `tapkit vhd check`.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { startDaemon } from './helpers/daemon';
import { qemuRaw, sevenZipRaw } from './helpers/vhd';
import type { DeviceSummary } from '../core/daemon/devices';
import { must, tapkit } from './helpers/run';

const MiB = 1 << 20;
/** What qemu-img makes of `8M` for vpc: the size its CHS geometry rounds to. */
const SIZE = 8390656;

function expectedDisk(): Buffer {
  const disk = Buffer.alloc(SIZE);
  disk.fill(0x11, 0, MiB);
  return disk;
}

/** A dynamic VHD made by qemu-img, its first MiB written with 0x11 by qemu-io. */
async function baseImage(dir: string, name = 'base.vhd'): Promise<string> {
  const file = path.join(dir, name);
  await must('qemu-img', ['create', '-q', '-f', 'vpc', '-o', 'subformat=dynamic', file, '8M']);
  await must('qemu-io', ['-f', 'vpc', '-c', 'write -q -P 0x11 0 1M', file]);
  return file;
}

test('snapshot makes a child, reopens the device on it and leaves the parent untouched', async (t) => {
  const daemon = await startDaemon();
  t.teardown(() => daemon.stop());
  const base = await baseImage(daemon.dir);
  const { id } = await daemon.ok<DeviceSummary>({ op: 'create', spec: `vhd:${base}` });
  const baseBefore = fs.readFileSync(base);

  const child = path.join(daemon.dir, 'snap1.vhd');
  const ctl = await tapkit(['ctl', '--control', daemon.control, 'snapshot', id, child]);
  t.is(ctl.code, 0, ctl.stderr);

  const [summary] = await daemon.ok<DeviceSummary[]>({ op: 'list' });
  t.is(summary.state, 'running');
  t.is(summary.spec, `vhd:${child}`);
  const vhdLayer = summary.chain.find((l) => l.provider === 'vhd')!;
  t.is(vhdLayer.location, child);
  t.is(vhdLayer.backing?.[0].location, base);

  await daemon.ok({ op: 'destroy', device: id });
  // The parent was complete before the child existed, and nothing wrote to it since.
  t.true(fs.readFileSync(base).equals(baseBefore));
  t.true((await qemuRaw(base, daemon.dir)).equals(expectedDisk()), 'qemu-img reads the parent as it was');
  t.true((await sevenZipRaw(child, daemon.dir)).equals(expectedDisk()), '7-Zip reads the chain as it was');
  const info = JSON.parse(await must('qemu-img', ['info', '--output=json', '-f', 'vpc', child])) as { 'virtual-size': number };
  t.is(info['virtual-size'], SIZE);
  for (const image of [base, child]) {
    const check = await tapkit(['vhd', 'check', image]);
    t.is(check.code, 0, check.stdout + check.stderr);
  }
  const check = await tapkit(['vhd', 'check', child]);
  t.is(check.code, 0, check.stdout + check.stderr);
});

test('snapshot into another directory: the parent stays reachable from the child', async (t) => {
  const daemon = await startDaemon();
  t.teardown(() => daemon.stop());
  const images = path.join(daemon.dir, 'images');
  const snapshots = path.join(daemon.dir, 'snapshots');
  fs.mkdirSync(images);
  fs.mkdirSync(snapshots);
  const base = await baseImage(images);
  const { id } = await daemon.ok<DeviceSummary>({ op: 'create', spec: `vhd:${base}` });
  const child = path.join(snapshots, 'child.vhd');
  const summary = await daemon.ok<DeviceSummary>({ op: 'snapshot', device: id, path: child });
  t.is(summary.spec, `vhd:${child}`);
  // A second snapshot stacks on the first.
  const grandchild = path.join(snapshots, 'grandchild.vhd');
  await daemon.ok({ op: 'snapshot', device: id, path: grandchild });
  const [after] = await daemon.ok<DeviceSummary[]>({ op: 'list' });
  const top = after.chain.find((l) => l.provider === 'vhd')!;
  t.is(top.location, grandchild);
  t.is(top.backing?.[0].location, child);
  t.is(top.backing?.[0].backing?.[0].location, base);
  await daemon.ok({ op: 'destroy', device: id });
  // 7-Zip looks for a parent by name beside its child only: give it the three side by side.
  const flat = path.join(daemon.dir, 'flat');
  fs.mkdirSync(flat);
  for (const image of [base, child, grandchild]) fs.copyFileSync(image, path.join(flat, path.basename(image)));
  t.true((await sevenZipRaw(path.join(flat, 'grandchild.vhd'), daemon.dir)).equals(expectedDisk()));
  // The chain leaves the snapshots' tree, so the check needs the images' directory allowed.
  const check = await tapkit(['vhd', 'check', '--allow-backing', images, grandchild]);
  t.is(check.code, 0, check.stdout + check.stderr);
});

test('snapshot refusals leave the device running on its old chain and no file behind', async (t) => {
  const daemon = await startDaemon();
  t.teardown(() => daemon.stop());
  const base = await baseImage(daemon.dir);
  const memory = await daemon.ok<DeviceSummary>({ op: 'create', spec: 'memory:8M' });
  const notVhd = await daemon.call({ op: 'snapshot', device: memory.id, path: path.join(daemon.dir, 'm.vhd') });
  t.false(notVhd.ok);
  t.regex(JSON.stringify(notVhd), /not served from a VHD/);
  t.false(fs.existsSync(path.join(daemon.dir, 'm.vhd')));

  const vhd = await daemon.ok<DeviceSummary>({ op: 'create', spec: `vhd:${base}` });
  const exists = await daemon.call({ op: 'snapshot', device: vhd.id, path: base });
  t.false(exists.ok);
  t.regex(JSON.stringify(exists), /EEXIST/);

  const readOnly = await daemon.ok<DeviceSummary>({ op: 'create', spec: `vhd:${base}`, readOnly: true });
  const ro = await daemon.call({ op: 'snapshot', device: readOnly.id, path: path.join(daemon.dir, 'ro.vhd') });
  t.false(ro.ok);
  t.regex(JSON.stringify(ro), /EROFS/);

  const missingDir = await daemon.call({ op: 'snapshot', device: vhd.id, path: path.join(daemon.dir, 'no', 'such', 'dir.vhd') });
  t.false(missingDir.ok);

  const list = await daemon.ok<DeviceSummary[]>({ op: 'list' });
  t.deepEqual(
    list.map((d) => [d.spec, d.state]),
    [
      ['memory:8M', 'running'],
      [`vhd:${base}`, 'running'],
      [`vhd:${base}`, 'running'],
    ],
  );
  t.deepEqual(fs.readdirSync(daemon.dir).filter((f) => f.endsWith('.vhd')).sort(), ['base.vhd']);
});
