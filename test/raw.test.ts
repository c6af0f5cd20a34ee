/**
 * The raw provider on real files and a real loop device: extents from SEEK_DATA/SEEK_HOLE
 * (checked against qemu-img map), hole punching, read-only opens, FUA, a block device's size.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import '../providers';
import { Opener } from '../core/open';
import type { Extent } from '../core/provider';
import { Vbd } from '../core/vbd';
import { must } from './helpers/run';

const KiB = 1024;
const MiB = 1024 * KiB;

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-raw-'));
test.after.always(() => fs.rmSync(dir, { recursive: true, force: true }));
let files = 0;

/** A sparse file of `size` bytes with `fill` written at each [offset, length). */
function sparseFile(size: number, written: Array<[number, number]> = [], fill = 0x5a): string {
  const file = path.join(dir, `disk-${files++}.img`);
  const fd = fs.openSync(file, 'w');
  fs.ftruncateSync(fd, size);
  for (const [offset, length] of written) fs.writeSync(fd, Buffer.alloc(length, fill), 0, length, offset);
  fs.closeSync(fd);
  return file;
}

async function open(spec: string, readOnly = false): Promise<Vbd> {
  return new Vbd(await new Opener({ readOnly }).open(spec));
}

function allocated(file: string): number {
  return fs.statSync(file).blocks * 512;
}

/** What qemu-img says is data, as [start, end) pairs, merged. */
async function qemuDataRanges(file: string): Promise<Array<[number, number]>> {
  const map = JSON.parse(await must('qemu-img', ['map', '-f', 'raw', '--output=json', file])) as Array<{
    start: number;
    length: number;
    data: boolean;
  }>;
  return merge(map.filter((e) => e.data).map((e) => [e.start, e.start + e.length] as [number, number]));
}

function ourDataRanges(runs: Extent[]): Array<[number, number]> {
  return merge(runs.filter((r) => r.type === 'data').map((r) => [r.offset, r.offset + r.length] as [number, number]));
}

function merge(ranges: Array<[number, number]>): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const r of ranges) {
    const last = out[out.length - 1];
    if (last && last[1] === r[0]) last[1] = r[1];
    else out.push([...r]);
  }
  return out;
}

test('extents come from SEEK_DATA/SEEK_HOLE and agree with qemu-img map', async (t) => {
  const file = sparseFile(16 * MiB, [
    [4 * MiB, MiB],
    [10 * MiB + 4096, 8192],
  ]);
  const vbd = await open(`raw:${file}`);
  t.teardown(() => vbd.close());
  const runs = await vbd.extents(0, 16 * MiB);
  t.deepEqual(runs, [
    { offset: 0, length: 4 * MiB, type: 'hole' },
    { offset: 4 * MiB, length: MiB, type: 'data' },
    { offset: 5 * MiB, length: 5 * MiB + 4096, type: 'hole' },
    { offset: 10 * MiB + 4096, length: 8192, type: 'data' },
    { offset: 10 * MiB + 12288, length: 6 * MiB - 12288, type: 'hole' },
  ]);
  t.deepEqual(ourDataRanges(runs), await qemuDataRanges(file), 'the same data ranges as qemu-img map');
  // A query inside a data run, and one inside a hole, are clipped to what was asked.
  t.deepEqual(await vbd.extents(4 * MiB + 10, 100), [{ offset: 4 * MiB + 10, length: 100, type: 'data' }]);
  t.deepEqual(await vbd.extents(MiB, 10), [{ offset: MiB, length: 10, type: 'hole' }]);
});

test('trim and zero punch holes: the allocated bytes drop and the range reads as zeros', async (t) => {
  const file = sparseFile(16 * MiB, [[0, 8 * MiB]]);
  const vbd = await open(`raw:${file}`);
  t.teardown(() => vbd.close());
  const before = allocated(file);
  t.true(before >= 8 * MiB, `8 MiB allocated (${before})`);
  await vbd.trim(MiB, 2 * MiB);
  t.true(allocated(file) <= before - 2 * MiB, `trim released 2 MiB (${before} -> ${allocated(file)})`);
  const afterTrim = allocated(file);
  await vbd.zero(4 * MiB, 2 * MiB, { mayTrim: true });
  t.true(allocated(file) <= afterTrim - 2 * MiB, `zero with mayTrim released 2 MiB (${afterTrim} -> ${allocated(file)})`);
  t.is(await vbd.top.allocatedBytes!(), allocated(file), 'allocatedBytes() is what stat says');
  // Zero without mayTrim (FALLOC_FL_ZERO_RANGE) reads as zeros too.
  await vbd.zero(7 * MiB + 5, 1000);
  const back = new Uint8Array(8 * MiB);
  await vbd.read(back, 0);
  const expected = new Uint8Array(8 * MiB).fill(0x5a);
  expected.fill(0, MiB, 3 * MiB);
  expected.fill(0, 4 * MiB, 6 * MiB);
  expected.fill(0, 7 * MiB + 5, 7 * MiB + 1005);
  t.true(Buffer.from(back).equals(Buffer.from(expected)));
  t.is(fs.statSync(file).size, 16 * MiB, 'the file keeps its size');
  const runs = await vbd.extents(0, 16 * MiB);
  t.true(runs.some((r) => r.type === 'hole' && r.offset <= MiB && r.offset + r.length >= 3 * MiB), 'the trimmed range is a hole');
  t.deepEqual(ourDataRanges(runs), await qemuDataRanges(file));
});

test('a read-only open uses a read-only descriptor and refuses changes with EROFS', async (t) => {
  const file = sparseFile(MiB, [[0, 4096]]);
  const vbd = await open(`raw:${file}`, true);
  t.teardown(() => vbd.close());
  t.true(vbd.info().readOnly);
  t.false(vbd.top.capabilities().write);
  const fd = (vbd.top as unknown as { handle: fs.promises.FileHandle }).handle.fd;
  const flags = parseInt(/flags:\s+(\d+)/.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))![1], 8);
  t.is(flags & 3, fs.constants.O_RDONLY, 'opened O_RDONLY');
  for (const attempt of [vbd.write(new Uint8Array(512), 0), vbd.zero(0, 512), vbd.trim(0, 512)]) {
    const error = await t.throwsAsync(attempt);
    t.is((error as { code?: string }).code, 'EROFS');
  }
  t.true(fs.readFileSync(file).subarray(0, 4096).every((b) => b === 0x5a), 'the file is unchanged');
});

test('a file that cannot be opened for writing names the problem', async (t) => {
  const error = await t.throwsAsync(new Opener().open(`raw:${path.join(dir, 'missing.img')}`));
  t.is((error as { code?: string }).code, 'ENOENT');
  t.regex(error!.message, /no such file/);
  const dirError = await t.throwsAsync(new Opener().open(dir));
  t.is((dirError as { code?: string }).code, 'EISDIR');
  const charError = await t.throwsAsync(new Opener().open('raw:/dev/null'));
  t.regex(charError!.message, /neither a regular file nor a block device/);
});

test('FUA writes and flush reach fdatasync', async (t) => {
  const file = sparseFile(MiB);
  const vbd = await open(`raw:${file}`);
  t.teardown(() => vbd.close());
  const handle = (vbd.top as unknown as { handle: fs.promises.FileHandle }).handle;
  let syncs = 0;
  const original = handle.datasync.bind(handle);
  handle.datasync = async () => {
    syncs++;
    return original();
  };
  await vbd.write(new Uint8Array(4096).fill(1), 0);
  t.is(syncs, 0, 'a plain write does not sync');
  await vbd.write(new Uint8Array(4096).fill(2), 4096, { fua: true });
  t.is(syncs, 1, 'a FUA write syncs before it is acknowledged');
  await vbd.zero(0, 4096, { fua: true });
  t.is(syncs, 2, 'a FUA zero syncs');
  await vbd.flush();
  t.is(syncs, 3, 'flush syncs');
  const onDisk = fs.readFileSync(file);
  t.true(onDisk.subarray(0, 4096).every((b) => b === 0) && onDisk.subarray(4096, 8192).every((b) => b === 2));
});

test('a loop device: size by ioctl, sector sizes, I/O, unaligned zero and trim', async (t) => {
  const file = sparseFile(24 * MiB, [[0, 24 * MiB]], 0x77);
  const device = (await must('losetup', ['-f', '--show', file])).trim();
  t.teardown(() => must('losetup', ['-d', device]));
  const vbd = await open(`raw:${device}`);
  t.teardown(() => vbd.close());
  const blockdevSize = Number((await must('blockdev', ['--getsize64', device])).trim());
  t.is(vbd.info().size, 24 * MiB);
  t.is(vbd.info().size, blockdevSize, 'the size blockdev reports');
  t.is(vbd.info().logicalBlockSize, Number((await must('blockdev', ['--getss', device])).trim()));
  t.deepEqual(vbd.top.describe!(), { path: device, type: 'block device', io: 'threads' });
  t.false(vbd.capabilities().extents, 'no extents on a block device');
  await vbd.write(new Uint8Array(1000).fill(1), 12345);
  // Unaligned: whole sectors go to BLKZEROOUT/BLKDISCARD, the edges are written.
  await vbd.zero(100, 5000);
  await vbd.trim(MiB + 7, 64 * KiB);
  await vbd.flush();
  const back = new Uint8Array(20000);
  await vbd.read(back, 0);
  const expected = new Uint8Array(20000).fill(0x77);
  expected.fill(0, 100, 5100);
  expected.fill(1, 12345, 13345);
  t.true(Buffer.from(back).equals(Buffer.from(expected)), 'zero cleared exactly its range');
  const edge = new Uint8Array(2);
  await vbd.read(edge, MiB + 6);
  t.is(edge[0], 0x77, 'trim leaves the partial sector before its range alone');
});

test('io: a file on tmpfs is read and written on the event loop, elsewhere on the thread pool; io= forces either; errors name the file', async (t) => {
  const shm = fs.mkdtempSync('/dev/shm/tapkit-raw-io-');
  t.teardown(() => fs.rmSync(shm, { recursive: true, force: true }));
  const inMemory = path.join(shm, 'disk.img');
  fs.writeFileSync(inMemory, Buffer.alloc(MiB, 0x33));
  const onDisk = sparseFile(MiB, [[0, MiB]], 0x44);
  const cases: Array<[string, string, number]> = [
    [`raw:${inMemory}`, 'sync', 0x33],
    [`raw:${onDisk}`, 'threads', 0x44],
    [`raw,io=threads:${inMemory}`, 'threads', 0x33],
    [`raw,io=sync:${onDisk}`, 'sync', 0x44],
  ];
  for (const [spec, io, fill] of cases) {
    const vbd = await open(spec);
    t.is(vbd.top.describe!().io, io, spec);
    const back = new Uint8Array(4096);
    await vbd.read(back, 8192);
    t.true(back.every((b) => b === fill), `${spec} reads its bytes`);
    await vbd.write(new Uint8Array(4096).fill(0x99), 4096, { fua: true });
    await vbd.read(back, 4096);
    t.true(back.every((b) => b === 0x99), `${spec} reads its write back`);
    await vbd.close();
  }
  t.is(fs.readFileSync(inMemory)[4096], 0x99, 'the write reached the file');
  await t.throwsAsync(open(`raw,io=fast:${inMemory}`), { message: /option io must be auto, sync or threads \(got 'fast'\)/ });
  // A read past a file cut short reads zeros on the sync path too.
  const vbd = await open(`raw:${inMemory}`);
  t.teardown(() => vbd.close());
  fs.truncateSync(inMemory, 4096);
  const tail = new Uint8Array(8192).fill(1);
  await vbd.read(tail, 0);
  t.true(tail.subarray(4096).every((b) => b === 0));
});
