/**
 * Damaged, hostile and unusual VHD images. Each refusal names its field (a bad cookie,
 * both footers bad, a BAT entry inside the metadata or past the end, a block size that is
 * not a power of two, a data offset that points nowhere, a BAT too small for the disk, an
 * unsupported version, a parent whose unique id differs, a parent cycle); the producers'
 * quirks that are not damage are read (the footer copy when the end is torn, the legacy
 * 511-byte footer, blktap's batmap, a `vpc ` creator whose CHS is smaller than the disk);
 * and fast-check corrupts footers, headers, BATs and bitmaps of real images: opening and
 * reading either works or fails with a typed error, never hangs or throws anything else.
 */
import test, { type ExecutionContext } from 'ava';
import fc from 'fast-check';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockError, CorruptImageError, type ErrnoName } from '../core/errors';
import { Opener } from '../core/open';
import { checkImage } from '../providers/vhd/check';
import { vhdChecksum } from '../providers/vhd/checksum';
import { createImage } from '../providers/vhd/create';
import { snapshotVhd } from '../providers/vhd/snapshot';
import { firstDifference, openSpec, qemuRaw, tapkitRaw } from './helpers/vhd';
import { bounded } from './helpers/bounded';
import { must } from './helpers/run';
import { fileTempDir } from './helpers/temp';

const dir = fileTempDir('tapkit-vhd-corrupt-');
const MiB = 2 ** 20;

const originals = {
  dynamic: path.join(dir, 'dynamic.vhd'),
  fixed: path.join(dir, 'fixed.vhd'),
  parent: path.join(dir, 'parent.vhd'),
};

test.before(async () => {
  // qemu-img's layout: footer copy, header @512, BAT @1536, blocks; 2 MiB blocks.
  await must('qemu-img', ['create', '-q', '-f', 'vpc', originals.dynamic, '6M']);
  await must('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x71 0 1M', '-c', 'write -P 0x72 4M 700k', originals.dynamic]);
  await must('qemu-img', ['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', originals.fixed, '3M']);
  await must('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x73 0 3M', originals.fixed]);
  await must('qemu-img', ['create', '-q', '-f', 'vpc', originals.parent, '4M']);
  await must('qemu-io', ['-f', 'vpc', '-c', 'write -P 0x74 0 4M', originals.parent]);
});

let copies = 0;
function copyOf(original: string, name = path.basename(original)): string {
  const file = path.join(dir, `c${copies++}-${name}`);
  fs.copyFileSync(original, file);
  return file;
}

function patch(file: string, offset: number, bytes: Uint8Array): void {
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, bytes, 0, bytes.length, offset);
  fs.closeSync(fd);
}

function readBytes(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  const buf = Buffer.alloc(length);
  fs.readSync(fd, buf, 0, length, offset);
  fs.closeSync(fd);
  return buf;
}

/** Changes a footer field (at `at` within the footer at `footerAt`) and fixes its checksum. */
function patchFooter(file: string, footerAt: number, edit: (b: Buffer) => void): void {
  const b = readBytes(file, footerAt, 512);
  edit(b);
  b.writeUInt32BE(vhdChecksum(b, 64), 64);
  patch(file, footerAt, b);
}

function patchBothFooters(file: string, edit: (b: Buffer) => void): void {
  patchFooter(file, 0, edit);
  patchFooter(file, fs.statSync(file).size - 512, edit);
}

function patchHeader(file: string, edit: (b: Buffer) => void): void {
  const b = readBytes(file, 512, 1024);
  edit(b);
  b.writeUInt32BE(vhdChecksum(b, 36), 36);
  patch(file, 512, b);
}

async function refused(t: ExecutionContext, file: string, field: string | RegExp, code: ErrnoName = 'EINVAL'): Promise<void> {
  const err = await t.throwsAsync(openSpec(`vhd:${file}`));
  t.true(err instanceof BlockError, `a BlockError, got ${String(err)}`);
  t.is((err as BlockError).code, code, err!.message);
  if (typeof field === 'string') {
    t.true(err instanceof CorruptImageError, `a CorruptImageError naming '${field}', got ${err!.message}`);
    t.is((err as CorruptImageError).field, field, err!.message);
  } else {
    t.regex(err!.message, field);
  }
  t.true(err!.message.includes(file), `the message names the image: ${err!.message}`);
}

// ---- refusals, each naming its field ------------------------------------------------

test('no conectix anywhere: refused, naming the footer cookie', async (t) => {
  const file = copyOf(originals.dynamic);
  patch(file, 0, Buffer.from('garbage!'));
  patch(file, fs.statSync(file).size - 512, Buffer.from('garbage!'));
  await refused(t, file, 'footer cookie');
});

test('a footer and its copy both with a bad checksum: refused, naming the checksum', async (t) => {
  const file = copyOf(originals.dynamic);
  patch(file, 64, Buffer.from([1, 2, 3, 4]));
  patch(file, fs.statSync(file).size - 512 + 64, Buffer.from([1, 2, 3, 4]));
  await refused(t, file, 'footer checksum');
});

test('an unsupported footer version or disk type: refused, naming the field', async (t) => {
  const version = copyOf(originals.dynamic);
  patchBothFooters(version, (b) => b.writeUInt32BE(0x00020000, 12));
  await refused(t, version, 'footer version');
  const type = copyOf(originals.dynamic);
  patchBothFooters(type, (b) => b.writeUInt32BE(5, 60));
  await refused(t, type, 'disk type');
});

test('a data offset that points nowhere: refused, naming the data offset', async (t) => {
  const past = copyOf(originals.dynamic);
  patchBothFooters(past, (b) => b.writeBigUInt64BE(2n ** 40n, 16));
  await refused(t, past, 'data offset');
  const notHeader = copyOf(originals.dynamic);
  patchBothFooters(notHeader, (b) => b.writeBigUInt64BE(1536n, 16));
  await refused(t, notHeader, 'data offset');
});

test('a block size that is not a power of two: refused, naming the block size', async (t) => {
  const file = copyOf(originals.dynamic);
  patchHeader(file, (b) => b.writeUInt32BE(3 * MiB, 32));
  await refused(t, file, 'block size');
});

test('a BAT with fewer entries than the disk needs: refused, naming max table entries', async (t) => {
  const file = copyOf(originals.dynamic);
  patchHeader(file, (b) => b.writeUInt32BE(2, 28));
  await refused(t, file, 'max table entries');
});

test('an unsupported dynamic header version: refused, naming it', async (t) => {
  const file = copyOf(originals.dynamic);
  patchHeader(file, (b) => b.writeUInt32BE(0x00020000, 24));
  await refused(t, file, 'dynamic header version');
});

test('a BAT entry inside the metadata or past the end of the file: refused, naming the entry', async (t) => {
  const inside = copyOf(originals.dynamic);
  patch(inside, 1536, Buffer.from([0, 0, 0, 1])); // sector 1: the dynamic header
  await refused(t, inside, 'bat[0]');
  const past = copyOf(originals.dynamic);
  patch(past, 1536 + 4, Buffer.from([0, 1, 0, 0]));
  await refused(t, past, 'bat[1]');
  // tapkit vhd check lists both problems of an image that has both.
  const both = copyOf(originals.dynamic);
  patch(both, 1536, Buffer.from([0, 0, 0, 1, 0, 1, 0, 0]));
  const report = await checkImage(both);
  t.deepEqual(report.problems.map((p) => p.field), ['bat[0]', 'bat[1]']);
});

test('a differencing child whose parent has another unique id: refused unless ignore-parent-uuid=1', async (t) => {
  const parent = copyOf(originals.parent, 'p.vhd');
  const child = path.join(dir, `c${copies++}-child.vhd`);
  await snapshotVhd(parent, child);
  // The parent gets another identity (as if it were replaced by another image of the same name).
  patchBothFooters(parent, (b) => b.fill(0x42, 68, 84));
  await refused(t, child, 'parent unique id');
  const warnings: string[] = [];
  const p = await openSpec(`vhd,ignore-parent-uuid=1:${child}`, true, (m) => warnings.push(m));
  const buf = Buffer.alloc(512);
  await p.read(buf, 0);
  await p.close();
  t.true(buf.every((b) => b === 0x74), 'the parent is used when told to');
  t.true(warnings.some((w) => /used anyway/.test(w)), warnings.join('\n'));
});

test('a parent that cannot be found, and a parent cycle: typed errors', async (t) => {
  const parent = copyOf(originals.parent, 'gone.vhd');
  const child = path.join(dir, `c${copies++}-orphan.vhd`);
  await snapshotVhd(parent, child);
  fs.rmSync(parent);
  const err = await t.throwsAsync(openSpec(`vhd:${child}`));
  t.is((err as BlockError).code, 'ENOENT', err!.message);
  t.regex(err!.message, /parent not found; tried W2ru/);
  // a → b → a: b is made over a, then a is rewritten into a child of b (same ids).
  const a = copyOf(originals.parent, 'loop-a.vhd');
  const b = path.join(dir, 'loop-b.vhd');
  await snapshotVhd(a, b);
  const aChild = path.join(dir, 'loop-a2.vhd');
  await snapshotVhd(b, aChild);
  // Give aChild the identity of a and put it in a's place: b's parent is now a child of b.
  const aId = readBytes(a, 68, 16);
  fs.renameSync(aChild, a);
  patchBothFooters(a, (x) => aId.copy(x, 68));
  const loop = await t.throwsAsync(openSpec(`vhd:${b}`));
  t.is((loop as BlockError).code, 'ELOOP', loop!.message);
});

// ---- producers' quirks --------------------------------------------------------------

test('a torn end (bad EOF footer) is read from the footer copy with a warning, and repaired when opened for writing', async (t) => {
  const file = copyOf(originals.dynamic);
  const expected = await qemuRaw(originals.dynamic, dir);
  patch(file, fs.statSync(file).size - 512 + 30, Buffer.from('XXXX'));
  const warnings: string[] = [];
  const p = await openSpec(`vhd:${file}`, true, (m) => warnings.push(m));
  await p.close();
  t.true(warnings.some((w) => /damaged.*copy at offset 0/.test(w)), warnings.join('\n'));
  t.is(firstDifference(await tapkitRaw(`vhd:${file}`), expected), -1);
  t.true((await checkImage(file)).problems.some((x) => x.field === 'footer checksum'));
  const w = await openSpec(`vhd:${file}`, false, () => {});
  await w.close();
  t.deepEqual((await checkImage(file)).problems, [], 'repaired');
  // qemu reads the repaired image as the original.
  t.is(firstDifference(await qemuRaw(file, dir), expected), -1);
});

test('a file cut short (no footer at the end) opens from the copy at offset 0', async (t) => {
  const file = copyOf(originals.dynamic);
  fs.truncateSync(file, fs.statSync(file).size - 200);
  const warnings: string[] = [];
  const p = await openSpec(`vhd:${file}`, true, (m) => warnings.push(m));
  await p.close();
  t.true(warnings.some((w) => /no footer at the end/.test(w)), warnings.join('\n'));
});

test('a fixed disk cut short is refused, naming the current size', async (t) => {
  const file = copyOf(originals.fixed);
  const size = fs.statSync(file).size;
  const footer = readBytes(file, size - 512, 512);
  fs.truncateSync(file, size - 4096);
  patch(file, size - 4096 - 512, footer);
  await refused(t, file, 'current size');
});

test('the legacy 511-byte footer (Virtual PC before 2004): dynamic and fixed images read as before', async (t) => {
  for (const original of [originals.dynamic, originals.fixed]) {
    const file = copyOf(original);
    const expected = await qemuRaw(original, dir);
    fs.truncateSync(file, fs.statSync(file).size - 1);
    const p = await openSpec(file);
    t.is(p.name, 'vhd', 'probed as a VHD');
    t.regex(String(p.describe?.().footer), /legacy 511-byte footer/);
    await p.close();
    t.is(firstDifference(await tapkitRaw(`vhd:${file}`), expected), -1, path.basename(original));
  }
});

test('blktap batmap: read, and cleared (never left claiming full blocks) when the BAT changes', async (t) => {
  // vhd-util is not packaged for Debian: a blktap-style image is built from a tapkit one by
  // moving the first block away from the BAT and putting a batmap header and map in between.
  const file = path.join(dir, 'tap.vhd');
  createImage(file, { size: 4 * MiB, type: 'dynamic', blockSize: 2 * MiB });
  const w = await openSpec(`vhd:${file}`, false);
  await w.write!(Buffer.alloc(2 * MiB, 0x61), 0, {});
  await w.close();
  // Layout now: footer copy, header @512, BAT @1536 (one sector), block 0 @2048, footer.
  const blockAt = 2048;
  const meta = readBytes(file, 0, 2048);
  const block = readBytes(file, blockAt, 512 + 2 * MiB);
  const footer = readBytes(file, blockAt + block.length, 512);
  const batmapHeaderAt = 2048;
  const mapAt = 2560;
  const newBlockAt = 3072;
  // Rebuilt: copy, header, BAT (entry 0 → the new place), batmap header + map, block, footer.
  fs.truncateSync(file, 0);
  const rebuilt = fs.openSync(file, 'r+');
  // Same identity as the footer we keep; creator 'tap\0' v1.3, OS 0, as blktap writes.
  const tapFooter = Buffer.from(footer);
  tapFooter.write('tap\0', 28, 'latin1');
  tapFooter.writeUInt32BE(0x00010003, 32);
  tapFooter.writeUInt32BE(0, 36);
  tapFooter.writeUInt32BE(vhdChecksum(tapFooter, 64), 64);
  tapFooter.copy(meta, 0);
  meta.writeUInt32BE(newBlockAt / 512, 1536);
  fs.writeSync(rebuilt, meta, 0, meta.length, 0);
  const bh = Buffer.alloc(512);
  bh.write('tdbatmap', 0, 'latin1');
  bh.writeBigUInt64BE(BigInt(mapAt), 8);
  bh.writeUInt32BE(1, 16);
  bh.writeUInt32BE(0x00010002, 20);
  const map = Buffer.alloc(512);
  map[0] = 0x80; // block 0 is full
  bh.writeUInt32BE(vhdChecksum(map, 512), 24);
  fs.writeSync(rebuilt, bh, 0, 512, batmapHeaderAt);
  fs.writeSync(rebuilt, map, 0, 512, mapAt);
  fs.writeSync(rebuilt, block, 0, block.length, newBlockAt);
  fs.writeSync(rebuilt, tapFooter, 0, 512, newBlockAt + block.length);
  fs.closeSync(rebuilt);
  t.deepEqual((await checkImage(file)).problems, []);
  const expected = Buffer.alloc(4 * MiB);
  expected.fill(0x61, 0, 2 * MiB);
  t.is(firstDifference(await tapkitRaw(`vhd:${file}`), expected), -1);
  t.is(firstDifference(await qemuRaw(file, dir), expected), -1, 'qemu agrees');
  // A write that allocates block 1 changes the BAT: the batmap must not claim anything wrongly.
  const p = await openSpec(`vhd:${file}`, false);
  await p.write!(Buffer.alloc(4096, 0x62), 3 * MiB, {});
  await p.close();
  expected.fill(0x62, 3 * MiB, 3 * MiB + 4096);
  const after = readBytes(file, mapAt, 512);
  t.true(after.every((b) => b === 0), 'batmap cleared');
  t.is(readBytes(file, batmapHeaderAt, 8).toString('latin1'), 'tdbatmap', 'batmap header kept');
  t.is(readBytes(file, batmapHeaderAt + 24, 4).readUInt32BE(0), vhdChecksum(after, 512), 'batmap checksum matches the map');
  t.is(readBytes(file, fs.statSync(file).size - 512 + 28, 4).toString('latin1'), 'tap\0', 'creator kept');
  t.is(firstDifference(await tapkitRaw(`vhd:${file}`), expected), -1);
  t.deepEqual((await checkImage(file)).problems, []);
});

test("a 'vpc ' creator with CHS smaller than the current size: tapkit uses the current size (qemu the CHS)", async (t) => {
  const file = path.join(dir, 'vpc-creator.vhd');
  const size = createImage(file, { size: 5 * MiB + 3 * 512, type: 'dynamic' });
  patchBothFooters(file, (b) => b.write('vpc ', 28, 'latin1'));
  const p = await openSpec(`vhd:${file}`);
  t.is(p.info().size, size);
  await p.close();
  const qemuSize = Number(JSON.parse(await must('qemu-img', ['info', '--output=json', file]))['virtual-size']);
  t.true(qemuSize < size, `qemu says ${qemuSize}`);
});

test('qemu force_size images: the current size, not the (maximal) CHS', async (t) => {
  const file = path.join(dir, 'force.vhd');
  await must('qemu-img', ['create', '-q', '-f', 'vpc', '-o', 'force_size=on', file, `${5 * MiB + 512}`]);
  const p = await openSpec(`vhd:${file}`);
  t.is(p.info().size, 5 * MiB + 512);
  t.is((p.describe?.() as Record<string, unknown>).geometry, '65535/16/255');
  await p.close();
});

// ---- fast-check: corrupt real images anywhere in their metadata ----------------------

/** How long one open-and-read of a corrupted image may take before the test calls it a hang. */
const HANG_MS = 20_000;

/**
 * Opens, reads the first 8 MiB and the last MiB, asks for extents (a bounded number of
 * calls: a corrupt header may claim a disk of petabytes); resolves to the error, if any.
 */
async function openAndRead(spec: string): Promise<unknown> {
  let p;
  try {
    p = await openSpec(spec);
    const size = p.info().size;
    const buf = Buffer.alloc(1 << 20);
    const ranges: Array<[number, number]> = [[0, Math.min(size, 8 << 20)], [Math.max(0, size - (1 << 20)), size]];
    for (const [from, to] of ranges) {
      for (let at = from; at < to; at += buf.length) await p.read(buf.subarray(0, Math.min(buf.length, to - at)), at);
    }
    for (let at = 0, calls = 0; at < size && calls < 50; calls++) {
      const runs = await p.extents!(at, size - at);
      if (runs.length === 0) throw new Error('extents returned nothing');
      at = runs[runs.length - 1].offset + runs[runs.length - 1].length;
    }
    return undefined;
  } catch (e) {
    return e;
  } finally {
    await p?.close().catch(() => {});
  }
}

const metadataRegions = (file: string): Array<[number, number]> => {
  const size = fs.statSync(file).size;
  // Footer copy, dynamic header, BAT, the first block's bitmap, and the footer.
  return [
    [0, 512],
    [512, 1536],
    [1536, 2048],
    [2048, 2560],
    [size - 512, size],
  ];
};

for (const [name, original] of [
  ['dynamic (qemu-img)', () => originals.dynamic],
  ['fixed (qemu-img)', () => originals.fixed],
] as const) {
  test(`fast-check: corrupted ${name} images open and read, or fail with a typed error`, async (t) => {
    const base = fs.readFileSync(original());
    const regions = metadataRegions(original());
    let refusedCount = 0;
    let opened = 0;
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ region: fc.nat(regions.length - 1), at: fc.nat(1023), byte: fc.nat(255) }), { minLength: 1, maxLength: 12 }),
        fc.boolean(),
        fc.nat(4096),
        async (edits, fixSums, cut) => {
          const file = path.join(dir, `fc-${copies++}.vhd`);
          const bytes = Buffer.from(base);
          for (const e of edits) {
            const [from, to] = regions[e.region];
            bytes[from + (e.at % (to - from))] = e.byte;
          }
          if (fixSums) {
            // Reach the checks behind the checksums too.
            for (const at of [0, bytes.length - 512]) bytes.writeUInt32BE(vhdChecksum(bytes.subarray(at, at + 512), 64), at + 64);
            if (bytes.length > 1536) bytes.writeUInt32BE(vhdChecksum(bytes.subarray(512, 1536), 36), 512 + 36);
          }
          fs.writeFileSync(file, cut > 3900 ? bytes.subarray(0, bytes.length - (cut - 3900)) : bytes);
          try {
            const err = await bounded(openAndRead(`vhd:${file}`), 'open and read', HANG_MS);
            if (err === undefined) opened++;
            else {
              refusedCount++;
              if (!(err instanceof BlockError)) throw new Error(`untyped error: ${String((err as Error)?.stack ?? err)}`);
            }
            const report = await bounded(checkImage(file), 'check', HANG_MS);
            if (!Array.isArray(report.problems)) throw new Error('check gave no problem list');
          } finally {
            fs.rmSync(file, { force: true });
          }
        },
      ),
      { numRuns: 150, seed: name.length * 7919 },
    );
    t.true(refusedCount > 0, `some corruptions were refused (${refusedCount}), some opened (${opened})`);
  });
}

test('fast-check: a differencing chain with a corrupted child or parent: typed errors only', async (t) => {
  const parent = copyOf(originals.parent, 'fcp.vhd');
  const child = path.join(dir, 'fcc.vhd');
  await snapshotVhd(parent, child, { blockSize: 512 * 1024 });
  const w = await openSpec(`vhd:${child}`, false);
  await w.write!(Buffer.alloc(3000, 0x19), 100_000, {});
  await w.close();
  const childBytes = fs.readFileSync(child);
  const parentBytes = fs.readFileSync(parent);
  let failures = 0;
  await fc.assert(
    fc.asyncProperty(fc.boolean(), fc.array(fc.tuple(fc.nat(), fc.nat(255)), { minLength: 1, maxLength: 8 }), async (inChild, edits) => {
      const target = inChild ? child : parent;
      const bytes = Buffer.from(inChild ? childBytes : parentBytes);
      // Child: anywhere in its metadata (footer copy, header, BAT, locators, bitmap). Parent: its footer, header and BAT.
      const span = inChild ? Math.min(bytes.length, 8192) : 2048;
      for (const [at, byte] of edits) bytes[at % span] = byte;
      fs.writeFileSync(target, bytes);
      try {
        const err = await bounded(openAndRead(`vhd:${child}`), 'open and read', HANG_MS);
        if (err !== undefined) {
          failures++;
          if (!(err instanceof BlockError)) throw new Error(`untyped error: ${String((err as Error)?.stack ?? err)}`);
        }
      } finally {
        fs.writeFileSync(child, childBytes);
        fs.writeFileSync(parent, parentBytes);
      }
    }),
    { numRuns: 120, seed: 4242 },
  );
  t.true(failures > 0);
});

// ---- parents through each kind of locator -------------------------------------------

/** Keeps only the locators whose codes are listed (the others are cleared), fixing the checksum. */
function keepLocators(file: string, codes: string[], parentName?: string): void {
  patchHeader(file, (b) => {
    for (let i = 0; i < 8; i++) {
      const at = 576 + i * 24;
      const code = b.toString('latin1', at, at + 4);
      if (b.readUInt32BE(at) !== 0 && !codes.includes(code)) b.fill(0, at, at + 24);
    }
    if (parentName !== undefined) {
      b.fill(0, 64, 576);
      Buffer.from(parentName, 'utf16le').swap16().copy(b, 64);
    }
  });
}

test('the parent is found through W2ru alone, MacX alone, W2ku alone, and the parent name alone', async (t) => {
  const sub = path.join(dir, 'locators');
  fs.mkdirSync(path.join(sub, 'kids'), { recursive: true });
  const parent = path.join(sub, 'base.vhd');
  fs.copyFileSync(originals.parent, parent);
  const cases: Array<[string, string[], string | undefined]> = [
    ['w2ru', ['W2ru'], ''],
    ['macx', ['MacX'], ''],
    ['w2ku', ['W2ku'], ''],
    // libvhdi's fallback: the base name of a Windows path, next to the child.
    ['name', [], 'C:\\Hyper-V\\base.vhd'],
  ];
  for (const [name, codes, parentName] of cases) {
    // Children in the parent's directory, so every relative name resolves inside the tree.
    const child = path.join(sub, `${name}.vhd`);
    await snapshotVhd(parent, child);
    keepLocators(child, codes, parentName);
    const p = await openSpec(`vhd:${child}`);
    t.is(p.backing?.location, parent, name);
    const buf = Buffer.alloc(512);
    await p.read(buf, 4096);
    t.true(buf.every((b) => b === 0x74), `${name}: the parent's data`);
    await p.close();
  }
  // A child in a subdirectory names its parent '..\base.vhd' (W2ru) and 'file://../base.vhd' (MacX).
  const below = path.join(sub, 'kids', 'below.vhd');
  await snapshotVhd(parent, below);
  keepLocators(below, ['MacX']);
  const err = await t.throwsAsync(openSpec(`vhd:${below}`));
  t.is((err as BlockError).code, 'EACCES', 'outside the child\'s tree: refused by the backing policy by default');
  const allowed = await new Opener({ readOnly: true, warn: () => {}, backing: { allow: [sub] } }).open(`vhd:${below}`);
  t.is(allowed.backing?.location, parent, 'found through MacX with --allow-backing');
  await allowed.close();
});

test('a fixed disk whose first sector holds a VHD footer is still the fixed disk (qemu would take it for dynamic)', async (t) => {
  const file = copyOf(originals.fixed);
  // The guest wrote a dynamic image's footer into its own sector 0.
  patch(file, 0, readBytes(originals.dynamic, 0, 512));
  const p = await openSpec(file);
  t.is(p.name, 'vhd');
  t.is(p.info().size, fs.statSync(originals.fixed).size - 512);
  t.is((p.describe?.() as Record<string, unknown>).type, 'fixed');
  const sector = Buffer.alloc(512);
  await p.read(sector, 0);
  t.is(sector.toString('latin1', 0, 8), 'conectix', 'sector 0 is the guest data');
  await p.close();
});
