/**
 * Damaged and hostile qcow2 images are refused with typed errors that name the cause,
 * never a crash, a hang, a huge allocation, or silent zeros: encrypted images, unknown
 * feature bits, bad header fields, overrunning extensions, L1/L2 entries and compressed
 * descriptors past the end, truncated files, backing loops, and fast-check fuzzing.
 */
import test, { type ExecutionContext } from 'ava';
import fc from 'fast-check';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockError, CorruptImageError, isBlockError, type ErrnoName } from '../core';
import { createEncrypted, headerFields, mixedContent, openVbd, qemuImg, qemuIo, readAll, readU64, writeBytes, writeU64 } from './helpers/qemu-images';
import { bounded } from './helpers/bounded';
import { run } from './helpers/run';
import { fileTempDir } from './helpers/temp';

let dir: string;
const images: Record<string, string> = {};

test.before(async () => {
  dir = fileTempDir('tapkit-qcow2-');
  const make = async (name: string, options: string, writes: string[]) => {
    const image = path.join(dir, `${name}.qcow2`);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', options, image, '4M']);
    await qemuIo(image, writes);
    images[name] = image;
  };
  await make('plain', 'cluster_size=64k', ['write -P 0x11 0 200k', 'write -P 0x22 3m 64k']);
  await make('v2', 'compat=0.10,cluster_size=4k', ['write -P 0x33 0 100k']);
  await make('extl2', 'extended_l2=on,cluster_size=64k', ['write -P 0x44 0 2k', 'write -P 0x45 8k 4k']);
  const src = path.join(dir, 'src.raw');
  fs.writeFileSync(src, mixedContent(1024 * 1024, 3));
  images.compressed = path.join(dir, 'compressed.qcow2');
  await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', src, images.compressed]);
  // LUKS creation times its key derivation for seconds: done here, before any test's timer runs.
  for (const format of ['aes', 'luks'] as const) {
    images[`enc-${format}`] = path.join(dir, `enc-${format}.qcow2`);
    await createEncrypted(images[`enc-${format}`], format);
  }
});

// Serial: one test measures this process's memory around an open; others running beside it would blur that.

let copies = 0;
function copyOf(name: string): string {
  const target = path.join(dir, `copy-${copies++}-${name}.qcow2`);
  fs.copyFileSync(images[name], target);
  return target;
}

/** How long one open (and read) of a corrupted image may take before the test calls it a hang: generous, for a loaded machine. */
const HANG_MS = 120_000;

/** Opens and reads everything (data and extents). Resolves to the error, or undefined when all went well. */
async function openAndRead(spec: string): Promise<unknown> {
  try {
    const vbd = await openVbd(spec);
    try {
      await readAll(vbd, 256 * 1024);
      const size = vbd.info().size;
      for (let pos = 0; pos < size; ) {
        const runs = await vbd.extents(pos, size - pos);
        pos = runs[runs.length - 1].offset + runs[runs.length - 1].length;
      }
    } finally {
      await vbd.close();
    }
    return undefined;
  } catch (e) {
    return e;
  }
}

async function assertRefusedAtOpen(t: ExecutionContext, image: string, message: RegExp, code?: ErrnoName): Promise<BlockError> {
  const error = await bounded(openVbd(`qcow2:${image}`).then(async (v) => {
    await v.close();
    return undefined;
  }, (e: unknown) => e), 'open', HANG_MS);
  t.true(isBlockError(error), `open refused with a BlockError (got ${String(error)})`);
  t.regex((error as Error).message, message);
  if (code) t.is((error as BlockError).code, code);
  return error as BlockError;
}

/** Opens fine, but reading the whole disk fails with EIO naming the damage. */
async function assertReadFails(t: ExecutionContext, image: string, message: RegExp): Promise<void> {
  const error = await bounded(openAndRead(`qcow2:${image}`), 'read', HANG_MS);
  t.true(error instanceof CorruptImageError, `read failed with a CorruptImageError (got ${String(error)})`);
  t.is((error as BlockError).code, 'EIO');
  t.regex((error as Error).message, message);
}

function setU32(file: string, offset: number, value: number): void {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value >>> 0, 0);
  writeBytes(file, offset, b);
}

/** The L2 table of L1 entry 0 and the host offset of its first entry. */
function firstL2(image: string): number {
  const { l1Offset } = headerFields(image);
  return Number(readU64(image, l1Offset) & 0x00fffffffffffe00n);
}

test.serial('encrypted images (AES and LUKS) are refused', async (t) => {
  for (const format of ['aes', 'luks'] as const) {
    const image = images[`enc-${format}`];
    await assertRefusedAtOpen(t, image, format === 'aes' ? /encrypted image \(legacy AES-CBC\)/ : /encrypted image \(LUKS\)/, 'EOPNOTSUPP');
  }
});

test.serial('unknown incompatible feature bits, the corrupt bit and bad versions are refused', async (t) => {
  let image = copyOf('plain');
  writeU64(image, 72, 1n << 7n);
  await assertRefusedAtOpen(t, image, /unknown incompatible feature bit 7/, 'EOPNOTSUPP');
  image = copyOf('plain');
  writeU64(image, 72, 1n << 1n);
  await assertRefusedAtOpen(t, image, /marked corrupt/);
  for (const version of [1, 4]) {
    image = copyOf('plain');
    setU32(image, 4, version);
    await assertRefusedAtOpen(t, image, /version/, 'EOPNOTSUPP');
  }
});

test.serial('header fields out of range are refused, naming the field', async (t) => {
  const cases: Array<[string, (image: string) => void, RegExp]> = [
    ['refcount order', (i) => setU32(i, 96, 7), /refcount_order 7 is out of range/],
    ['header length past the cluster', (i) => setU32(i, 100, 0x20000), /header_length 131072 is invalid/],
    ['header length not a multiple of 8', (i) => setU32(i, 100, 108), /header_length 108/],
    ['cluster bits', (i) => setU32(i, 20, 22), /cluster_bits 22 is out of range/],
    ['cluster bits too small', (i) => setU32(i, 20, 8), /cluster_bits 8 is out of range/],
    ['L1 size beyond the limit', (i) => setU32(i, 36, 0x10000000), /L1 table of 268435456 entries is larger than the 32 MiB limit/],
    ['L1 too small for the disk', (i) => writeU64(i, 24, 1n << 40n), /L1 table of 1 entries is too small/],
    ['L1 table past the end', (i) => writeU64(i, 40, 1n << 40n), /l1_table_offset .* outside/],
    ['L1 table unaligned', (i) => writeU64(i, 40, 0x30200n), /l1_table_offset .* not aligned/],
    ['size beyond 2^53', (i) => writeU64(i, 24, 1n << 60n), /size .* beyond 2\^53/],
    ['too many snapshots', (i) => setU32(i, 60, 0x7fffffff), /2147483647 snapshots is more than the limit/],
    ['snapshot table past the end', (i) => (setU32(i, 60, 3), writeU64(i, 64, 1n << 40n)), /snapshots_offset .* outside/],
    ['no refcount table', (i) => setU32(i, 56, 0), /refcount table has no clusters/],
    ['unknown encryption method', (i) => setU32(i, 32, 9), /unknown encryption method 9/],
    ['compression type without its bit', (i) => writeBytes(i, 104, Buffer.from([1])), /compression_type 1 without/],
    ['backing name too long', (i) => (writeU64(i, 8, 512n), setU32(i, 16, 5000)), /backing file name of 5000 bytes/],
    ['backing name past the first cluster', (i) => (writeU64(i, 8, 65530n), setU32(i, 16, 100)), /outside the first cluster/],
  ];
  for (const [what, damage, message] of cases) {
    const image = copyOf('plain');
    damage(image);
    const error = await assertRefusedAtOpen(t, image, message);
    t.true(error instanceof CorruptImageError || error.code === 'EOPNOTSUPP', `${what}: a typed refusal`);
  }
});

test.serial('hostile L1 sizes: the limit bounds what is allocated, and a larger claim is refused before any allocation', async (t) => {
  const MiB = 1024 * 1024;
  // At the limit: 4 Mi entries (32 MiB), inside a file made long enough (sparse).
  const atLimit = copyOf('plain');
  const { l1Offset } = headerFields(atLimit);
  setU32(atLimit, 36, 4 * MiB);
  fs.truncateSync(atLimit, l1Offset + 32 * MiB);
  const before = process.memoryUsage().arrayBuffers;
  const vbd = await bounded(openVbd(`qcow2:${atLimit}`), 'open', HANG_MS);
  const grown = process.memoryUsage().arrayBuffers - before;
  try {
    t.true(grown <= 40 * MiB, `an L1 at the 32 MiB limit costs about 32 MiB (grew ${(grown / MiB).toFixed(1)} MiB)`);
    const head = Buffer.alloc(64 * 1024);
    await vbd.read(head, 0);
    t.true(head.every((b) => b === 0x11), 'and the image still reads');
  } finally {
    await vbd.close();
  }
  // Beyond it, up to the largest u32: refused by the limit, whatever the file's size.
  for (const entries of [4 * MiB + 1, 0xffffffff]) {
    const hostile = copyOf('plain');
    setU32(hostile, 36, entries);
    const start = process.memoryUsage().arrayBuffers;
    await assertRefusedAtOpen(t, hostile, /larger than the 32 MiB limit/);
    const used = process.memoryUsage().arrayBuffers - start;
    t.true(used < 8 * MiB, `${entries} entries refused without allocating them (grew ${(used / MiB).toFixed(1)} MiB)`);
  }
  // A snapshot claiming a huge L1 is refused when the snapshot table is read.
  const snap = path.join(dir, 'hostile-snap.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', snap, '1M']);
  await qemuImg(['snapshot', '-c', 's1', snap]);
  const snapshotsOffset = Number(readU64(snap, 64));
  setU32(snap, snapshotsOffset + 8, 0x7fffffff);
  await assertRefusedAtOpen(t, snap, /snapshot 0 has an L1 table of 2147483647 entries/);
});

test.serial('a header extension that overruns its area is refused', async (t) => {
  const image = copyOf('plain');
  const bytes = fs.readFileSync(image);
  // qemu writes a feature-name table (0x6803f857) in every v3 image.
  const at = bytes.indexOf(Buffer.from([0x68, 0x03, 0xf8, 0x57]), 104);
  t.true(at >= 104);
  setU32(image, at + 4, 0x10000);
  await assertRefusedAtOpen(t, image, /header extension 0x6803f857 .* overruns the extension area/);
});

test.serial('a backing-format extension that is too long is refused', async (t) => {
  const base = path.join(dir, 'fmt-base.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '1M']);
  const image = path.join(dir, 'fmt-top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'fmt-base.qcow2', '-F', 'qcow2', image]);
  const at = fs.readFileSync(image).indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]), 104);
  setU32(image, at + 4, 40);
  await assertRefusedAtOpen(t, image, /backing format name of 40 bytes is too long/);
});

test.serial('an L1 entry pointing past the end of the file fails the read (no silent zeros)', async (t) => {
  const image = copyOf('plain');
  const { l1Offset } = headerFields(image);
  writeU64(image, l1Offset, (1n << 63n) | (1n << 40n));
  await assertReadFails(t, image, /L1 entry 0 points to an L2 table at 1099511627776, past the end/);
  const misaligned = copyOf('plain');
  writeU64(misaligned, l1Offset, readU64(misaligned, l1Offset) + 512n);
  await assertReadFails(t, misaligned, /L1 entry 0 points to .* not aligned/);
});

test.serial('an L2 entry pointing past the end, or misaligned, fails the read', async (t) => {
  const image = copyOf('plain');
  const l2 = firstL2(image);
  writeU64(image, l2, (1n << 63n) | (1n << 36n));
  await assertReadFails(t, image, /guest offset 0 maps to 68719476736 .* past the end/);
  const misaligned = copyOf('plain');
  writeU64(misaligned, l2, readU64(misaligned, l2) + 4096n);
  await assertReadFails(t, misaligned, /L2 entry 0 .* not aligned/);
  const v2 = copyOf('v2');
  const l2v2 = firstL2(v2);
  writeU64(v2, l2v2 + 8 * 5, 1n << 45n);
  await assertReadFails(t, v2, /past the end/);
});

test.serial('a compressed descriptor past the end, and damaged compressed data, fail the read', async (t) => {
  const image = copyOf('compressed');
  const l2 = firstL2(image);
  let index = 0;
  while (index < 16 && (readU64(image, l2 + index * 8) & (1n << 62n)) === 0n) index++;
  t.true(index < 16, 'found a compressed cluster');
  const entry = readU64(image, l2 + index * 8);
  // 64 KiB clusters: offset in bits 0..53, sector count above.
  const offsetMask = (1n << 54n) - 1n;
  const original = Number(entry & offsetMask);
  writeU64(image, l2 + index * 8, (entry & ~offsetMask) | (1n << 40n));
  await assertReadFails(t, image, /compressed data at 1099511627776 .* past the end/);

  const garbled = copyOf('compressed');
  writeBytes(garbled, original, Buffer.alloc(64, 0xff));
  await assertReadFails(t, garbled, /compressed cluster at guest offset \d+ .*(damaged|decodes to)/);
});

test.serial('an extended L2 entry marked both allocated and zero fails the read', async (t) => {
  const image = copyOf('extl2');
  const l2 = firstL2(image);
  writeU64(image, l2 + 8, (1n << 32n) | 1n);
  await assertReadFails(t, image, /both allocated and zero/);
});

/** `qemu-img check`'s verdict: its exit code (2: corruptions found) and the corruption count. */
async function qemuCheck(image: string): Promise<{ code: number | null; corruptions: number }> {
  const r = await run('qemu-img', ['check', '--output=json', image]);
  let corruptions = 0;
  try {
    corruptions = (JSON.parse(r.stdout) as { corruptions?: number }).corruptions ?? 0;
  } catch {
    // No JSON: the image did not even open; the exit code says so.
  }
  return { code: r.code, corruptions };
}

/** What qemu-io gives for a read of the first bytes: 'eio', or the bytes it returned. */
async function qemuIoRead(image: string, offset = 0): Promise<'eio' | 'zeros' | 'data'> {
  const r = await run('qemu-io', ['-r', '-f', 'qcow2', '-c', `read -v ${offset} 16`, image]);
  if (/Input\/output error/.test(r.stdout + r.stderr)) return 'eio';
  return /^[0-9a-f]{8}: +00( 00){15} /m.test(r.stdout) ? 'zeros' : 'data';
}

test.serial('damage qemu-img check finds is refused too, including L1/L2 pointers past the end that qemu-io reads as zeros', async (t) => {
  // The first compressed cluster of the 'compressed' image (64 KiB clusters).
  let compressedIndex = 0;
  const l2c = firstL2(images.compressed);
  while (compressedIndex < 16 && (readU64(images.compressed, l2c + compressedIndex * 8) & (1n << 62n)) === 0n) compressedIndex++;
  t.true(compressedIndex < 16, 'the compressed image has a compressed cluster');
  const cases: Array<{ what: string; from: string; damage: (image: string) => void; qemuIo: 'eio' | 'zeros'; ours: RegExp; at?: number }> = [
    { what: 'L1 entry past the end', from: 'plain', damage: (i) => writeU64(i, headerFields(i).l1Offset, (1n << 63n) | (1n << 40n)), qemuIo: 'zeros', ours: /L1 entry 0 .* past the end/ },
    { what: 'L1 entry misaligned', from: 'plain', damage: (i) => writeU64(i, headerFields(i).l1Offset, readU64(i, headerFields(i).l1Offset) + 512n), qemuIo: 'eio', ours: /L1 entry 0 .* not aligned/ },
    { what: 'L2 entry past the end', from: 'plain', damage: (i) => writeU64(i, firstL2(i), (1n << 63n) | (1n << 36n)), qemuIo: 'zeros', ours: /guest offset 0 maps to .* past the end/ },
    { what: 'L2 entry misaligned', from: 'plain', damage: (i) => writeU64(i, firstL2(i), readU64(i, firstL2(i)) + 4096n), qemuIo: 'eio', ours: /L2 entry 0 .* not aligned/ },
    { what: 'subclusters both allocated and zero', from: 'extl2', damage: (i) => writeU64(i, firstL2(i) + 8, (1n << 32n) | 1n), qemuIo: 'eio', ours: /both allocated and zero/ },
    {
      what: 'compressed data past the end',
      from: 'compressed',
      damage: (i) => {
        const at = firstL2(i) + compressedIndex * 8;
        const offsetMask = (1n << 54n) - 1n;
        writeU64(i, at, (readU64(i, at) & ~offsetMask) | (1n << 40n));
      },
      qemuIo: 'eio',
      ours: /compressed data at 1099511627776 .* past the end/,
      at: compressedIndex * 65536,
    },
  ];
  for (const c of cases) {
    const image = copyOf(c.from);
    t.is((await qemuCheck(image)).code, 0, `${c.what}: the undamaged copy passes qemu-img check`);
    c.damage(image);
    const verdict = await qemuCheck(image);
    t.is(verdict.code, 2, `${c.what}: qemu-img check reports corruption`);
    t.true(verdict.corruptions > 0, `${c.what}: qemu-img check counts corruptions`);
    t.is(await qemuIoRead(image, c.at), c.qemuIo, `${c.what}: qemu-io reads ${c.qemuIo === 'eio' ? 'fail' : 'silent zeros'}`);
    await assertReadFails(t, image, c.ours);
  }
});

test.serial('truncated files are refused at open or fail the read, never read as zeros', async (t) => {
  const image = copyOf('plain');
  const size = fs.statSync(image).size;
  // The data at 3 MiB is the last cluster written: cut into it.
  fs.truncateSync(image, size - 1000);
  await assertReadFails(t, image, /past the end/);
  for (const length of [0, 50, 100, 70_000]) {
    const cut = copyOf('plain');
    fs.truncateSync(cut, length);
    const error = await bounded(openAndRead(`qcow2:${cut}`), 'open', HANG_MS);
    t.true(isBlockError(error), `cut at ${length}: refused with a BlockError (got ${String(error)})`);
  }
});

test.serial('a backing loop and a missing backing file are refused with their names', async (t) => {
  const a = path.join(dir, 'loop-a.qcow2');
  const b = path.join(dir, 'loop-b.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', a, '1M']);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'loop-a.qcow2', '-F', 'qcow2', b]);
  await qemuImg(['rebase', '-u', '-f', 'qcow2', '-b', 'loop-b.qcow2', '-F', 'qcow2', a]);
  const error = await assertRefusedAtOpen(t, a, /loops/, 'ELOOP');
  t.regex(error.message, /loop-b\.qcow2|loop-a\.qcow2/);
  const self = path.join(dir, 'self.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', self, '1M']);
  await qemuImg(['rebase', '-u', '-f', 'qcow2', '-b', 'self.qcow2', '-F', 'qcow2', self]);
  await assertRefusedAtOpen(t, self, /loops/, 'ELOOP');
  const orphan = path.join(dir, 'orphan.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.raw', '-F', 'raw', orphan, '1M']);
  await assertRefusedAtOpen(t, orphan, /cannot open backing file 'gone.raw'/, 'ENOENT');
});

test.serial('fuzzed headers are refused with typed errors or read, never crash or hang', async (t) => {
  const original = fs.readFileSync(images.plain);
  const target = path.join(dir, 'fuzz-header.qcow2');
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.record({ at: fc.nat({ max: 511 }), value: fc.nat({ max: 255 }) }), { minLength: 1, maxLength: 8 }),
      async (edits) => {
        const bytes = Buffer.from(original);
        for (const { at, value } of edits) bytes[at] = value;
        fs.writeFileSync(target, bytes);
        const error = await bounded(openAndRead(`qcow2:${target}`), 'fuzzed open', HANG_MS);
        return error === undefined || isBlockError(error);
      },
    ),
    { numRuns: 150, seed: 4242 },
  );
  t.pass();
});

test.serial('fuzzed L1 and L2 tables are refused with typed errors or read, never crash or hang', async (t) => {
  for (const name of ['plain', 'extl2', 'compressed']) {
    const original = fs.readFileSync(images[name]);
    const { l1Offset } = headerFields(images[name]);
    const l2 = firstL2(images[name]);
    const target = path.join(dir, `fuzz-l2-${name}.qcow2`);
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ table: fc.constantFrom(l1Offset, l2), entry: fc.nat({ max: 31 }), value: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }) }), { minLength: 1, maxLength: 4 }),
        async (edits) => {
          const bytes = Buffer.from(original);
          for (const { table, entry, value } of edits) bytes.writeBigUInt64BE(value, table + entry * 8);
          fs.writeFileSync(target, bytes);
          const error = await bounded(openAndRead(`qcow2:${target}`), 'fuzzed read', HANG_MS);
          return error === undefined || isBlockError(error);
        },
      ),
      { numRuns: 60, seed: 99 },
    );
  }
  t.pass();
});
