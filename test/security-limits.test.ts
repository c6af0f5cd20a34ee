/**
 * Resource limits against hostile headers (core/limits.ts). Each hostile image asks for
 * far more memory than the limits allow; it is refused with the limit named, before
 * anything large is allocated: the open runs in a child process whose peak RSS is
 * compared with the same child opening a sane image. Each limit can be raised (or
 * lowered) with `--limit NAME=VALUE`, and the CLI names it in its one-line error.
 */
import test from 'ava';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import '../providers';
import { isBlockError, Opener, type OpenOptions } from '../core';
import { openInChild, type ChildResult } from './helpers/child-open';
import { qcow2Naming, vhdChild, vpcImage, plantVhdParent } from './helpers/hostile';
import { headerFields, qemuImg, qemuIo, qemuRaw, readU64, writeBytes, writeU64 } from './helpers/qemu-images';
import { validateConfig } from '../core/daemon/config';
import { tapkit } from './helpers/run';

const MiB = 1024 * 1024;
/** Peak RSS a refused open may add over a sane open: far below every hostile request (≥ 512 MiB). */
const RSS_MARGIN_KIB = 96 * 1024;

let dir: string;
let baselineKiB = 0;

test.before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-limits-'));
  const sane = path.join(dir, 'sane.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', sane, '64M']);
  await qemuIo(sane, ['write -P 0x12 0 1M']);
  const result = await openInChild(`qcow2:${sane}`, {}, MiB);
  if (!result.ok) throw new Error(`the sane image did not open: ${result.error?.message}`);
  baselineKiB = result.maxRssKiB;
});

test.after.always(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

function u32(file: string, at: number, value: number): void {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value >>> 0);
  writeBytes(file, at, b);
}

/** Grows a file sparsely to `size` bytes (its data stays where it is). */
function growSparse(file: string, size: number): void {
  fs.truncateSync(file, size);
}

function vhdSum(b: Buffer, skipAt: number): number {
  let sum = 0;
  for (let i = 0; i < b.length; i++) if (i < skipAt || i >= skipAt + 4) sum = (sum + b[i]) >>> 0;
  return ~sum >>> 0;
}

/**
 * Rewrites a dynamic VHD's header (BAT entries, block size) and both footers (size),
 * with checksums, and moves the footer to the end of a sparse file of `fileSize` bytes.
 */
function patchVhd(file: string, change: { entries?: number; blockSize?: number; currentSize?: bigint; fileSize?: number }): void {
  const fd = fs.openSync(file, 'r+');
  try {
    const footer = Buffer.alloc(512);
    fs.readSync(fd, footer, 0, 512, 0);
    const headerAt = Number(footer.readBigUInt64BE(16));
    const header = Buffer.alloc(1024);
    fs.readSync(fd, header, 0, 1024, headerAt);
    if (change.entries !== undefined) header.writeUInt32BE(change.entries >>> 0, 28);
    if (change.blockSize !== undefined) header.writeUInt32BE(change.blockSize >>> 0, 32);
    header.writeUInt32BE(vhdSum(header, 36), 36);
    fs.writeSync(fd, header, 0, 1024, headerAt);
    if (change.currentSize !== undefined) {
      footer.writeBigUInt64BE(change.currentSize, 40);
      footer.writeBigUInt64BE(change.currentSize, 48);
    }
    footer.writeUInt32BE(vhdSum(footer, 64), 64);
    fs.writeSync(fd, footer, 0, 512, 0);
    const size = change.fileSize ?? fs.fstatSync(fd).size;
    fs.ftruncateSync(fd, size);
    fs.writeSync(fd, footer, 0, 512, size - 512);
  } finally {
    fs.closeSync(fd);
  }
}

let copies = 0;
function copy(file: string): string {
  const target = path.join(dir, `c${copies++}-${path.basename(file)}`);
  fs.copyFileSync(file, target);
  return target;
}

function assertRefusedLean(t: import('ava').ExecutionContext, result: ChildResult, limit: RegExp, what: string): void {
  t.false(result.ok, `${what}: refused`);
  t.true(result.error?.typed, `${what}: a typed error (${result.error?.name}: ${result.error?.message})`);
  t.regex(result.error!.message, limit, what);
  t.true(result.maxRssKiB < baselineKiB + RSS_MARGIN_KIB, `${what}: peak RSS ${result.maxRssKiB} KiB, sane open ${baselineKiB} KiB`);
}

test('VHD: a BAT of 2^28 or 2^32-1 entries, or a disk needing 2^40, is refused before it is allocated', async (t) => {
  const base = await vpcImage(path.join(dir, 'bat.vhd'), '4M', []);
  const big = copy(base);
  // 2^28 entries = a 1 GiB table, inside a sparse file large enough to hold it.
  patchVhd(big, { entries: 2 ** 28, fileSize: 2 ** 30 + 4 * MiB });
  assertRefusedLean(t, await openInChild(`vhd:${big}`), /BAT claims 268435456 entries, more than the 4194304 limit \(limit bat-entries; raise it with --limit bat-entries=N\)/, '2^28 entries');
  const huge = copy(base);
  patchVhd(huge, { entries: 0xffffffff, fileSize: 17 * 2 ** 30 });
  assertRefusedLean(t, await openInChild(`vhd:${huge}`), /BAT claims 4294967295 entries/, '2^32-1 entries');
  // 2^40 blocks of 512 bytes: more entries than the field can hold; refused by the limit first.
  const deep = copy(base);
  patchVhd(deep, { blockSize: 512, currentSize: 2n ** 49n });
  assertRefusedLean(t, await openInChild(`vhd:${deep}`), /needs 1099511627776 BAT entries, more than the 4194304 limit \(limit bat-entries/, '2^40 blocks');
});

test('qcow2: an L1 table of 1 GiB or 32 GiB is refused before it is allocated', async (t) => {
  const base = path.join(dir, 'l1.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '1G']);
  for (const [entries, fileSize] of [[2 ** 27, 2 ** 30 + 8 * MiB], [0xffffffff, 33 * 2 ** 30]] as const) {
    const image = copy(base);
    u32(image, 36, entries);
    growSparse(image, fileSize);
    const result = await openInChild(`qcow2:${image}`);
    assertRefusedLean(t, result, new RegExp(`L1 table of ${entries} entries is larger than the 32 MiB limit \\(limit l1-size; raise it with --limit l1-size=SIZE\\)`), `${entries} L1 entries`);
    t.is(result.error?.limit, 'l1-size');
  }
});

/** A deflate stream of `bytes` zeros, made without holding them: a decompression bomb. */
async function deflateBomb(bytes: number): Promise<Buffer> {
  const deflate = zlib.createDeflateRaw({ level: 9 });
  const chunks: Buffer[] = [];
  deflate.on('data', (c: Buffer) => chunks.push(c));
  const done = new Promise((resolve, reject) => deflate.on('end', resolve).on('error', reject));
  const zeros = Buffer.alloc(16 * MiB);
  for (let written = 0; written < bytes; written += zeros.length) {
    if (!deflate.write(zeros)) await new Promise((r) => deflate.once('drain', r));
  }
  deflate.end();
  await done;
  return Buffer.concat(chunks);
}

/** A zstd frame of `bytes` zeros without a content size (the decoder learns its size by decoding). */
function zstdBomb(bytes: number): Buffer {
  return execFileSync('sh', ['-c', `head -c ${bytes} /dev/zero | zstd -q -3 --no-content-size -c`], { timeout: 120_000, maxBuffer: 64 << 20 });
}

for (const compression of ['zlib', 'zstd'] as const) {
  test(`qcow2: a ${compression} cluster that inflates to 512 MiB is cut at one cluster and refused`, async (t) => {
    const raw = path.join(dir, `bomb-src-${compression}.raw`);
    const content = Buffer.alloc(2 * MiB);
    for (let i = 0; i < content.length; i++) content[i] = (i % 251) ^ (i >> 11);
    fs.writeFileSync(raw, content);
    const image = path.join(dir, `bomb-${compression}.qcow2`);
    await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=2M,compression_type=${compression}`, raw, image]);
    const { l1Offset, clusterBits } = headerFields(image);
    const l2 = Number(readU64(image, l1Offset) & 0x00fffffffffffe00n);
    t.true((readU64(image, l2) >> 62n & 1n) === 1n, 'qemu stored the cluster compressed');
    const bomb = compression === 'zlib' ? await deflateBomb(512 * MiB) : zstdBomb(512 * MiB);
    const at = Math.ceil(fs.statSync(image).size / 512) * 512;
    writeBytes(image, at, bomb);
    const sectors = Math.ceil(bomb.length / 512);
    t.true(sectors - 1 < 2 ** (clusterBits - 8), 'the bomb fits one descriptor');
    const offsetBits = BigInt(62 - (clusterBits - 8));
    writeU64(image, l2, (1n << 62n) | (BigInt(sectors - 1) << offsetBits) | BigInt(at));
    const result = await openInChild(`qcow2:${image}`, {}, 64 * 1024);
    assertRefusedLean(t, result, new RegExp(`${compression === 'zlib' ? 'deflate' : 'zstd'} data decodes to more than one cluster \\(2097152 bytes\\)`), 'the bomb');
    t.is(result.error?.code, 'EIO');
  });
}

test('qcow2: an unbounded chain (an image naming itself through a symlinked directory) ends, whatever the depth limit', async (t) => {
  const loopDir = fs.mkdtempSync(path.join(dir, 'loop-'));
  fs.symlinkSync('.', path.join(loopDir, 'a'));
  // x.qcow2 names a/x.qcow2, which names a/a/x.qcow2, ...: a new name at every level, one file.
  const image = await qcow2Naming(path.join(loopDir, 'x.qcow2'), 'a/x.qcow2', { format: 'qcow2' });
  for (const options of [{}, { maxChainDepth: 1_000_000 }] as OpenOptions[]) {
    const result = await openInChild(`qcow2:${image}`, options);
    assertRefusedLean(t, result, /backing chain loops/, `depth limit ${options.maxChainDepth ?? 'default'}`);
    t.is(result.error?.code, 'ELOOP');
  }
});

test('qcow2: a chain deeper than chain-depth is refused naming the limit; raised, it opens and reads as qemu reads it', async (t) => {
  const chainDir = fs.mkdtempSync(path.join(dir, 'chain-'));
  const base = path.join(chainDir, 'l0.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', base, '1M']);
  await qemuIo(base, ['write -P 0x61 0 64k']);
  for (let i = 1; i <= 20; i++) await qcow2Naming(path.join(chainDir, `l${i}.qcow2`), `l${i - 1}.qcow2`, { format: 'qcow2' });
  const top = path.join(chainDir, 'l20.qcow2');
  await qemuIo(top, ['write -P 0x62 128k 64k']);
  const result = await openInChild(`qcow2:${top}`);
  assertRefusedLean(t, result, /backing chain deeper than 16 \(limit chain-depth; raise it with --max-chain-depth N\)/, 'depth 20');
  const opened = await new Opener({ readOnly: true, limits: { 'chain-depth': 20 } }).open(`qcow2:${top}`);
  try {
    const got = Buffer.alloc(1024 * 1024);
    await opened.read(got, 0);
    t.true(got.equals(await qemuRaw(top)));
  } finally {
    await opened.close();
  }
});

async function refusedWith(spec: string, options: OpenOptions): Promise<Error & { limit?: string }> {
  const error = await new Opener({ readOnly: true, warn: () => {}, ...options }).open(spec).then(
    async (p) => {
      await p.close();
      return undefined;
    },
    (e: unknown) => e,
  );
  if (!isBlockError(error)) throw new Error(`${spec} opened (or failed untyped: ${String(error)})`);
  return error as Error & { limit?: string };
}

test('every limit a sane image meets can be lowered to refuse it, naming the limit and its flag', async (t) => {
  const image = path.join(dir, 'limits.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', image, '1G']);
  await qemuImg(['snapshot', '-c', 'one', image]);
  const parent = await vpcImage(path.join(dir, 'limits-parent.vhd'));
  const child = vhdChild(path.join(dir, 'limits-child.vhd'), parent);
  plantVhdParent(child, 'limits-parent.vhd');
  const cases: Array<[string, string, Partial<Record<string, number>>]> = [
    [`qcow2:${image}`, 'l1-size', { 'l1-size': 8 }],
    [`qcow2:${image}`, 'snapshots', { snapshots: 0 }],
    [`qcow2:${image}`, 'header-extensions', { 'header-extensions': 0 }],
    [`qcow2:${image}`, 'metadata-memory', { 'metadata-memory': 1024 * 1024 }],
    [`qcow2:${image}`, 'snapshot-table-size', { 'snapshot-table-size': 16 }],
    [`vhd:${parent}`, 'bat-entries', { 'bat-entries': 1 }],
    [`vhd:${child}`, 'locator-size', { 'locator-size': 8 }],
    [`vhd:${child}`, 'metadata-memory', { 'metadata-memory': 4 * 1024 * 1024 + 8 }],
  ];
  for (const [spec, limit, values] of cases) {
    const error = await refusedWith(spec, { limits: values });
    t.regex(error.message, new RegExp(`limit ${limit}; raise it with --limit ${limit}=`), `${limit}: ${error.message}`);
  }
  // And with the defaults every one of them opens.
  for (const spec of [`qcow2:${image}`, `vhd:${parent}`, `vhd:${child}`]) {
    const p = await new Opener({ readOnly: true, warn: () => {} }).open(spec);
    await p.close();
    t.pass();
  }
});

test('tapkit --limit: a lowered limit is named on stderr (exit 1); an unknown one is a usage error (exit 2)', async (t) => {
  const image = path.join(dir, 'cli.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', image, '1G']);
  const refused = await tapkit(['info', '--limit', 'l1-size=8', `qcow2:${image}`]);
  t.is(refused.code, 1);
  t.regex(refused.stderr, /^tapkit: .*L1 table of 2 entries is larger than the 8 B limit \(limit l1-size; raise it with --limit l1-size=SIZE\) \[EFBIG\]\n$/);
  const raised = await tapkit(['info', '--json', '--limit', 'l1-size=1M', '--limit', 'metadata-memory=1G', `qcow2:${image}`]);
  t.is(raised.code, 0, raised.stderr);
  const usage = await tapkit(['info', '--limit', 'l1-sise=1M', `qcow2:${image}`]);
  t.is(usage.code, 2);
  t.regex(usage.stderr, /--limit takes NAME=VALUE with NAME one of chain-depth, metadata-memory, l1-size/);
});

test('the daemon config takes limits by name and refuses unknown ones', (t) => {
  const config = validateConfig({ limits: { maxChainDepth: 4, 'l1-size': 1 << 20, 'bat-entries': 1000 }, devices: [] });
  t.deepEqual(config.limits?.values, { 'l1-size': 1 << 20, 'bat-entries': 1000 });
  t.is(config.limits?.maxChainDepth, 4);
  t.throws(() => validateConfig({ limits: { 'l1-sise': 1 }, devices: [] }), { message: /unknown limit 'limits\.l1-sise'/ });
  t.throws(() => validateConfig({ limits: { 'l1-size': -1 }, devices: [] }), { message: /'limits\.l1-size' must be a whole number/ });
});
