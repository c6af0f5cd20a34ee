/**
 * `tapkit convert -O vhd` (qemu-img's `-O vpc`): a qcow2 made and written by qemu-img and
 * qemu-io becomes a VHD that qemu-img reads back equal, that `tapkit vhd check` passes,
 * and that stays sparse; fixed VHDs, block sizes, and what is refused.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { must, run, tapkit } from './helpers/run';
import { tempDir } from './helpers/temp';

const MiB = 1 << 20;

async function qcow2WithData(dir: string): Promise<string> {
  const file = path.join(dir, 'source.qcow2');
  await must('qemu-img', ['create', '-q', '-f', 'qcow2', file, '64M']);
  await must('qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0x5a 0 64k', '-c', 'write -q -P 0xa5 5M 1M', '-c', 'write -q -P 0x3c 40M 4k', file]);
  return file;
}

test('a qcow2 becomes a dynamic VHD: qemu-img compares it equal, tapkit vhd check passes, only written blocks take space', async (t) => {
  const dir = tempDir(t, 'tapkit-convert-vhd-');
  const source = await qcow2WithData(dir);
  const out = path.join(dir, 'out.vhd');
  const r = await tapkit(['convert', '-O', 'vhd', source, out], { timeoutMs: 120_000 });
  t.is(r.code, 0, r.stderr);
  await must('qemu-img', ['compare', '-q', '-f', 'vpc', '-F', 'qcow2', out, source]);
  const info = JSON.parse(await must('qemu-img', ['info', '--output=json', '-f', 'vpc', out]));
  t.is(info['virtual-size'], 64 * MiB, 'qemu sees the exact size (creator "win ": current_size)');
  const check = await tapkit(['vhd', 'check', out]);
  t.is(check.code, 0, check.stdout + check.stderr);
  // Three 2 MiB blocks hold data (0, 4–6 MiB, 40 MiB); the rest of the 64 MiB is not allocated.
  t.true(fs.statSync(out).size < 8 * MiB, `the VHD file is ${fs.statSync(out).size} bytes`);
});

test('-o subformat=fixed and -O vpc with block_size: qemu-img reads both equal; the block size is the one asked', async (t) => {
  const dir = tempDir(t, 'tapkit-convert-vhd-opts-');
  const source = await qcow2WithData(dir);
  const fixed = path.join(dir, 'fixed.vhd');
  t.is((await tapkit(['convert', '-O', 'vhd', '-o', 'subformat=fixed', source, fixed], { timeoutMs: 120_000 })).code, 0);
  await must('qemu-img', ['compare', '-q', '-f', 'vpc', '-F', 'qcow2', fixed, source]);
  t.is(fs.statSync(fixed).size, 64 * MiB + 512, 'a fixed VHD is the data and a footer');
  const small = path.join(dir, 'small-blocks.vhd');
  const r = await tapkit(['convert', '-O', 'vpc', '-o', 'subformat=dynamic,block_size=512K', source, small], { timeoutMs: 120_000 });
  t.is(r.code, 0, r.stderr);
  await must('qemu-img', ['compare', '-q', '-f', 'vpc', '-F', 'qcow2', small, source]);
  t.is(JSON.parse(await must('qemu-img', ['info', '--output=json', '-f', 'vpc', small]))['cluster-size'], 512 * 1024);
});

test('an existing file is replaced (as by qemu-img); a size that is not whole sectors is rounded up with zeros', async (t) => {
  const dir = tempDir(t, 'tapkit-convert-vhd-odd-');
  const raw = path.join(dir, 'odd.raw');
  fs.writeFileSync(raw, Buffer.alloc(1_000_000, 0x42));
  const out = path.join(dir, 'out.vhd');
  fs.writeFileSync(out, 'not a VHD at all');
  const r = await tapkit(['convert', '-O', 'vhd', raw, out]);
  t.is(r.code, 0, r.stderr);
  const size = JSON.parse(await must('qemu-img', ['info', '--output=json', '-f', 'vpc', out]))['virtual-size'];
  t.is(size, 1_000_448);
  // qemu-img compare checks that the larger image's extra part is zeros.
  await must('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'vpc', raw, out]);
});

test('refused with a usage error: an output format there is none of, an option the format does not take, a bad subformat, VHD onto a block device', async (t) => {
  const dir = tempDir(t, 'tapkit-convert-vhd-bad-');
  const out = path.join(dir, 'x');
  const cases: Array<[string[], RegExp]> = [
    [['-O', 'qcow2'], /unsupported output format 'qcow2' \(supported: raw, vhd, vpc\)/],
    [['-O', 'vhd', '-o', 'cluster_size=64k'], /vhd has no option 'cluster_size' \(it takes: subformat, block_size\)/],
    [['-O', 'raw', '-o', 'subformat=fixed'], /raw has no option 'subformat' \(it takes none\)/],
    [['-O', 'vhd', '-o', 'subformat=stream'], /subformat must be dynamic or fixed/],
    [['-O', 'vhd', '-o', 'block_size'], /-o needs key=value/],
  ];
  for (const [args, message] of cases) {
    const r = await tapkit(['convert', ...args, 'memory:1M', out]);
    t.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    t.regex(r.stderr, message);
    t.false(fs.existsSync(out), 'nothing created');
  }
  const image = path.join(dir, 'loop.img');
  fs.writeFileSync(image, Buffer.alloc(4 * MiB));
  const device = (await must('losetup', ['-f', '--show', image])).trim();
  t.teardown(() => run('losetup', ['-d', device]));
  const onto = await tapkit(['convert', '-O', 'vhd', 'memory:1M', device]);
  t.is(onto.code, 2);
  t.regex(onto.stderr, /block device: only -O raw/);
});
