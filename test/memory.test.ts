/** The memory provider: sparse, limited on request, gives memory back on trim and zero. */
import test from 'ava';
import '../providers';
import { SpecError } from '../core/errors';
import { Opener } from '../core/open';
import { Vbd } from '../core/vbd';

const KiB = 1024;
const MiB = 1024 * KiB;

async function open(spec: string): Promise<Vbd> {
  return new Vbd(await new Opener().open(spec));
}

test('memory:1T costs nothing until written, and only what is written', async (t) => {
  const vbd = await open('memory:1T');
  t.teardown(() => vbd.close());
  const size = 2 ** 40;
  t.is(vbd.info().size, size);
  t.is(await vbd.top.allocatedBytes!(), 0);
  t.deepEqual(await vbd.extents(0, size), [{ offset: 0, length: size, type: 'hole' }]);
  const data = new Uint8Array(4096).fill(0x42);
  await vbd.write(data, size - 4096);
  await vbd.write(data, 2 ** 39 + 100);
  t.is(await vbd.top.allocatedBytes!(), 2 * 64 * KiB, 'two 64 KiB chunks');
  const back = new Uint8Array(4096);
  await vbd.read(back, size - 4096);
  t.deepEqual(back, data);
  const runs = await vbd.extents(0, size);
  t.deepEqual(runs.map((r) => r.type), ['hole', 'data', 'hole', 'data']);
  t.is(runs[1].offset, 2 ** 39);
  t.is(runs[3].offset + runs[3].length, size);
});

test('limit answers ENOSPC and changes nothing; trimming makes room again', async (t) => {
  const vbd = await open('memory,limit=1M:1G');
  t.teardown(() => vbd.close());
  await vbd.write(new Uint8Array(MiB).fill(1), 0);
  t.is(await vbd.top.allocatedBytes!(), MiB);
  await vbd.write(new Uint8Array(MiB).fill(2), 0); // overwriting costs nothing new
  const error = await t.throwsAsync(vbd.write(new Uint8Array(10).fill(3), 512 * MiB));
  t.is((error as SpecError).code, 'ENOSPC');
  // A write that would need a chunk beyond the limit is refused as a whole, even its old part.
  await t.throwsAsync(vbd.write(new Uint8Array(2 * 64 * KiB).fill(4), MiB - 64 * KiB), { message: /limit/ });
  const back = new Uint8Array(MiB);
  await vbd.read(back, 0);
  t.true(back.every((b) => b === 2), 'the refused writes changed nothing');
  t.is(await vbd.top.allocatedBytes!(), MiB);
  await vbd.trim(0, 64 * KiB);
  await vbd.write(new Uint8Array(10).fill(3), 512 * MiB);
  const small = new Uint8Array(10);
  await vbd.read(small, 512 * MiB);
  t.true(small.every((b) => b === 3));
});

test('trim and zero give whole chunks back and read as zeros', async (t) => {
  const vbd = await open('memory:64M');
  t.teardown(() => vbd.close());
  await vbd.write(new Uint8Array(4 * MiB).fill(9), 0);
  t.is(await vbd.top.allocatedBytes!(), 4 * MiB);
  await vbd.trim(0, MiB);
  t.is(await vbd.top.allocatedBytes!(), 3 * MiB);
  await vbd.zero(MiB, MiB);
  t.is(await vbd.top.allocatedBytes!(), 2 * MiB);
  // A partial chunk is cleared but stays allocated.
  await vbd.zero(2 * MiB + 100, 1000);
  t.is(await vbd.top.allocatedBytes!(), 2 * MiB);
  const back = new Uint8Array(4 * MiB);
  await vbd.read(back, 0);
  t.true(back.subarray(0, 2 * MiB).every((b) => b === 0));
  t.true(back.subarray(2 * MiB + 100, 2 * MiB + 1100).every((b) => b === 0));
  t.is(back[2 * MiB + 99], 9);
  t.is(back[2 * MiB + 1100], 9);
  const runs = await vbd.extents(0, 64 * MiB);
  t.deepEqual(runs, [
    { offset: 0, length: 2 * MiB, type: 'hole' },
    { offset: 2 * MiB, length: 2 * MiB, type: 'data' },
    { offset: 4 * MiB, length: 60 * MiB, type: 'hole' },
  ]);
});

test('a read-only memory disk refuses writes', async (t) => {
  const vbd = new Vbd(await new Opener({ readOnly: true }).open('memory:1M'));
  t.teardown(() => vbd.close());
  t.true(vbd.info().readOnly);
  await t.throwsAsync(vbd.write(new Uint8Array(1), 0), { message: /read-only/ });
});

test('bad memory specs are refused as usage errors naming the spec', async (t) => {
  for (const [spec, pattern] of [
    ['memory:12Q', /malformed memory size '12Q' in spec 'memory:12Q'/],
    ['memory:', /memory needs a size/],
    ['memory,limit=lots:1G', /malformed memory limit 'lots' in spec 'memory,limit=lots:1G'/],
    ['memory,colour=red:1G', /provider 'memory' has no option 'colour'/],
    ['memory:99E', /not a whole number of bytes below 2\^53/],
  ] as const) {
    const error = await t.throwsAsync(new Opener().open(spec), { message: pattern }, spec);
    t.true(error instanceof SpecError && error.usage, `${spec} is a usage error`);
  }
});

test('readViews lends the chunks themselves and agrees with read, holes included', async (t) => {
  const vbd = await open('memory:4M');
  t.teardown(() => vbd.close());
  t.true(vbd.lendsReads);
  // Data across chunk boundaries with a hole chunk between the written runs.
  const data = new Uint8Array(200 * KiB);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
  await vbd.write(data.subarray(0, 100 * KiB), 10 * KiB);
  await vbd.write(data.subarray(100 * KiB), 300 * KiB);
  for (const [offset, length] of [[0, 512 * KiB], [10 * KiB + 1, 99 * KiB], [63 * KiB, 3 * KiB], [129 * KiB, 200 * KiB], [4 * MiB - 5, 5]]) {
    const views = await vbd.readViews(offset, length);
    t.is(views.reduce((n, v) => n + v.length, 0), length);
    const expected = new Uint8Array(length);
    await vbd.read(expected, offset);
    t.deepEqual(Buffer.concat(views), Buffer.from(expected), `${offset}+${length}`);
  }
  t.deepEqual(await vbd.readViews(0, 0), []);
  await t.throwsAsync(vbd.readViews(4 * MiB - 5, 6), { code: 'EINVAL' });
  // The caveat of the contract: a view still held shows a later write (it is not a copy).
  const [view] = await vbd.readViews(10 * KiB, 16);
  await vbd.write(new Uint8Array(16).fill(0xee), 10 * KiB);
  t.is(view[0], 0xee);
  // A hole's view is zeros, and writing next to it does not change it.
  const [hole] = await vbd.readViews(3 * MiB, 4096);
  await vbd.write(new Uint8Array(4096).fill(9), 3 * MiB + 4096);
  t.true(hole.every((b) => b === 0));
});
