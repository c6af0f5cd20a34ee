/**
 * The http source (and the cache filter over it) against a real nginx serving raw, VHD
 * and qcow2 images made by qemu-img: every read equals what qemu-img reads from the
 * local file, `tapkit convert URL out.raw` writes the same bytes, a qcow2 whose backing
 * file nginx also serves reads its backing file over http, and `tapkit serve` of an
 * image on nginx is checked by `qemu-img compare` against the local image.
 */
import 'reflect-metadata';
import '../providers';
import test from 'ava';
import { execFile } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Opener, openSpec } from '../core/open';
import type { Provider } from '../core/provider';
import { serve } from './helpers/nbd';
import { startNginx, type Nginx } from './helpers/nginx';
import { must, run } from './helpers/run';
import { tempDir } from './helpers/temp';

/** One row per image format served: how qemu-img writes the image and which spec opens it over http. */
interface ImageCase {
  /** qemu-img's name for the format. */
  format: string;
  file: string;
  /** The provider on top once opened. */
  provider: string;
  spec: (url: string) => string;
}
const IMAGES: ImageCase[] = [
  { format: 'raw', file: 'disk.raw', provider: 'http', spec: (url) => url },
  { format: 'vpc', file: 'disk.vhd', provider: 'vhd', spec: (url) => `vhd:${url}` },
  { format: 'qcow2', file: 'disk.qcow2', provider: 'qcow2', spec: (url) => `qcow2:${url}` },
  // Bare URLs: the format is probed from the object's first and last bytes.
  { format: 'qcow2', file: 'probed.qcow2', provider: 'qcow2', spec: (url) => url },
  { format: 'vpc', file: 'probed.vhd', provider: 'vhd', spec: (url) => url },
];

const SIZE = 8 << 20;
const CLI = path.join(__dirname, '../core/cli/main.js');

let nginx: Nginx;
let root: string;
let work: string;

async function qemuImg(args: string[]): Promise<void> {
  await must('qemu-img', args);
}

/** A raw source with data, zeros and holes, written by us: the images are converted from it by qemu-img. */
function makeSource(file: string): void {
  const fd = fs.openSync(file, 'w');
  fs.ftruncateSync(fd, SIZE);
  for (let off = 0; off < SIZE; off += 1 << 20) {
    // Half of each MiB holds random bytes, the rest is left a hole.
    fs.writeSync(fd, crypto.randomBytes(512 << 10), 0, 512 << 10, off + ((off >> 20) % 2) * (256 << 10));
  }
  fs.writeSync(fd, crypto.randomBytes(4096), 0, 4096, SIZE - 4096);
  fs.closeSync(fd);
}

/**
 * base.qcow2 (the source) and top.qcow2 naming it by a relative name, with qemu-io
 * writes of its own over parts of the base; both served by nginx.
 */
async function makeBackedQcow2(source: string): Promise<void> {
  await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', source, path.join(root, 'base.qcow2')]);
  await qemuImg(['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', path.join(root, 'top.qcow2')]);
  const writes = ['write -P 0x5a 0 64k', 'write -P 0xa5 3000k 1500k', 'write -z 5M 256k', 'write -P 0x11 8388096 512'];
  await must('qemu-io', ['-f', 'qcow2', ...writes.flatMap((c) => ['-c', c]), path.join(root, 'top.qcow2')]);
  await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', path.join(root, 'top.qcow2'), path.join(work, 'top.qcow2.expected')]);
}

/** Writes the VHD child makes over its parent: [offset, length, byte]. */
const CHILD_WRITES: Array<[number, number, number]> = [
  [0, 4096, 0x61],
  [(2 << 20) - 512, 1024, 0x62],
  [5 << 20, 300 << 10, 0x63],
  [SIZE - 512, 512, 0x64],
];

/**
 * child.vhd: a differencing VHD over disk.vhd (made by qemu-img). No Debian tool
 * creates differencing VHDs, so `tapkit vhd snapshot` does, and its bytes are checked
 * against what 7-Zip extracts from the local chain before the test relies on them.
 */
async function makeVhdChild(): Promise<void> {
  const child = path.join(root, 'child.vhd');
  await must(process.execPath, [CLI, 'vhd', 'snapshot', child, '--parent', path.join(root, 'disk.vhd')]);
  const p = await openSpec(`vhd:${child}`, { warn: () => {} });
  const expected = fs.readFileSync(path.join(work, 'disk.vhd.expected'));
  for (const [offset, length, byte] of CHILD_WRITES) {
    const bytes = Buffer.alloc(length, byte);
    await p.write!(bytes, offset, {});
    bytes.copy(expected, offset);
  }
  await p.close();
  const extracted = path.join(work, '7z-child');
  await must('7zz', ['x', '-y', `-o${extracted}`, child]);
  const [name] = fs.readdirSync(extracted);
  if (!fs.readFileSync(path.join(extracted, name)).equals(expected)) throw new Error('7-Zip reads child.vhd differently from the writes made to it');
  fs.writeFileSync(path.join(work, 'child.vhd.expected'), expected);
}

test.before(async () => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-nginx-root-'));
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-nginx-work-'));
  fs.chmodSync(root, 0o755);
  const source = path.join(work, 'source.raw');
  makeSource(source);
  for (const image of IMAGES) {
    await qemuImg(['convert', '-f', 'raw', '-O', image.format, source, path.join(root, image.file)]);
    // What the image holds, as qemu-img reads it.
    await qemuImg(['convert', '-f', image.format, '-O', 'raw', path.join(root, image.file), path.join(work, `${image.file}.expected`)]);
  }
  fs.copyFileSync(source, path.join(root, 'object.raw'));
  await makeBackedQcow2(source);
  await makeVhdChild();
  nginx = await startNginx(root);
});

test.after.always(async () => {
  await nginx?.stop();
  fs.rmSync(root, { recursive: true, force: true });
  fs.rmSync(work, { recursive: true, force: true });
});

async function openHere(t: { teardown(fn: () => Promise<void> | void): void }, spec: string, warn: (m: string) => void = () => {}): Promise<Provider> {
  const p = await openSpec(spec, { readOnly: true, warn });
  t.teardown(() => p.close());
  return p;
}

/** Reads the whole disk with concurrent reads of assorted sizes and offsets. */
async function readAllScattered(p: Provider, size: number): Promise<Buffer> {
  const out = Buffer.alloc(size);
  const pieces: Array<[number, number]> = [];
  for (let off = 0; off < size; ) {
    const len = Math.min(size - off, [512, 4096, 65536, 300_000, 1 << 20][pieces.length % 5]);
    pieces.push([off, len]);
    off += len;
  }
  // Out of order, 16 at a time.
  pieces.sort(() => Math.random() - 0.5);
  for (let i = 0; i < pieces.length; i += 16) {
    await Promise.all(pieces.slice(i, i + 16).map(([off, len]) => p.read(out.subarray(off, off + len), off)));
  }
  return out;
}

function runCli(args: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000 }, (error, _stdout, stderr) => {
      resolve({ code: error ? (typeof error.code === 'number' ? error.code : -1) : 0, stderr });
    });
  });
}

for (const image of IMAGES) {
  test(`${image.file} over nginx: every read equals the local image`, async (t) => {
    const expected = fs.readFileSync(path.join(work, `${image.file}.expected`));
    const p = await openHere(t, image.spec(`${nginx.base}/${image.file}`));
    t.is(p.name, image.provider);
    t.is(p.info().size, expected.length);
    t.true((await readAllScattered(p, expected.length)).equals(expected));
    // Sequential small reads (readahead) too.
    const seq = Buffer.alloc(2 << 20);
    for (let off = 0; off < seq.length; off += 4096) await p.read(seq.subarray(off, off + 4096), off);
    t.true(seq.equals(expected.subarray(0, seq.length)));
  });

  test(`${image.file} over nginx through the cache filter`, async (t) => {
    const expected = fs.readFileSync(path.join(work, `${image.file}.expected`));
    const p = await openHere(t, `cache,size=2M,block=64K:${image.spec(`${nginx.base}/${image.file}`)}`);
    t.true((await readAllScattered(p, expected.length)).equals(expected));
    t.true((await readAllScattered(p, expected.length)).equals(expected));
  });

  test(`${image.file} over nginx: tapkit convert writes the same bytes`, async (t) => {
    const out = path.join(work, `${image.file}.converted`);
    const result = await runCli(['convert', image.spec(`${nginx.base}/${image.file}`), out]);
    t.is(result.code, 0, result.stderr);
    t.true(fs.readFileSync(out).equals(fs.readFileSync(path.join(work, `${image.file}.expected`))));
    fs.rmSync(out, { force: true });
  });
}

test.serial('a file-backed cache starts warm after a restart, and is discarded when the object changed', async (t) => {
  const object = path.join(root, 'object.raw');
  const cacheFile = path.join(work, 'object.cache');
  const spec = `cache,size=4M,block=64K,file=${cacheFile}:${nginx.base}/object.raw`;
  const first = await openSpec(spec, { readOnly: true, warn: () => {} });
  const buf = Buffer.alloc(2 << 20);
  await first.read(buf, 1 << 20);
  t.true(buf.equals(fs.readFileSync(object).subarray(1 << 20, 3 << 20)));
  await first.close();
  t.true(fs.existsSync(`${cacheFile}.index`));

  const warm = await openSpec(spec, { readOnly: true, warn: () => {} });
  let warmOpen = true;
  t.teardown(() => (warmOpen ? warm.close() : undefined));
  t.is((warm.describe!() as { cachedBlocks: number }).cachedBlocks, 32);
  const again = Buffer.alloc(2 << 20);
  await warm.read(again, 1 << 20);
  t.true(again.equals(buf));
  t.like(warm.describe!(), { hits: 32, misses: 0 });
  warmOpen = false;
  await warm.close();

  // A new version of the object (nginx's ETag is mtime and size): the saved index is for the old one.
  const fresh = crypto.randomBytes(SIZE);
  fs.writeFileSync(object, fresh);
  fs.utimesSync(object, new Date(), new Date(Date.now() + 10_000));
  const warnings: string[] = [];
  const cold = await openSpec(spec, { readOnly: true, warn: (m) => warnings.push(m) });
  t.teardown(() => cold.close());
  t.is((cold.describe!() as { cachedBlocks: number }).cachedBlocks, 0);
  t.true(warnings.some((w) => /another version/.test(w)), warnings.join('\n'));
  const now = Buffer.alloc(2 << 20);
  await cold.read(now, 1 << 20);
  t.true(now.equals(fresh.subarray(1 << 20, 3 << 20)));
});

test('a qcow2 whose backing file nginx also serves reads it over http', async (t) => {
  const expected = fs.readFileSync(path.join(work, 'top.qcow2.expected'));
  const p = await openHere(t, `qcow2:${nginx.base}/top.qcow2`);
  t.is(p.backing?.location, `${nginx.base}/base.qcow2`);
  t.is(p.backing?.name, 'qcow2');
  t.is(p.backing?.lower?.name, 'http');
  t.true((await readAllScattered(p, expected.length)).equals(expected));
});

test('a differencing VHD on nginx reads its parent from nginx too', async (t) => {
  const expected = fs.readFileSync(path.join(work, 'child.vhd.expected'));
  const p = await openHere(t, `${nginx.base}/child.vhd`);
  t.is(p.name, 'vhd');
  // The child's absolute locator names a local file: a URL image may not reach it, so the relative one is used.
  t.is(p.backing?.location, `${nginx.base}/disk.vhd`);
  t.true((await readAllScattered(p, expected.length)).equals(expected));
});

for (const file of ['disk.qcow2', 'top.qcow2']) {
  test(`tapkit serve qcow2:http://…/${file} reads as qemu-img reads the local image (qemu-img compare)`, async (t) => {
    const socket = path.join(tempDir(t, 'tapkit-http-serve-'), 'nbd.sock');
    const server = await serve(t, ['--read-only', '--socket', socket, `qcow2:${nginx.base}/${file}`]);
    await must('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', path.join(root, file), server.uri], { timeoutMs: 120_000 });
    // compare can fail: one byte changed in a copy of the local image is seen.
    const changed = path.join(tempDir(t, 'tapkit-http-changed-'), 'changed.raw');
    fs.copyFileSync(path.join(work, `${file}.expected`), changed);
    const fd = fs.openSync(changed, 'r+');
    fs.writeSync(fd, Buffer.from([fs.readFileSync(changed)[777_777] ^ 0xff]), 0, 1, 777_777);
    fs.closeSync(fd);
    const differ = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', changed, server.uri], { timeoutMs: 120_000 });
    t.is(differ.code, 1, differ.stdout + differ.stderr);
    t.is(await server.stop(), 0);
  });
}

test('tapkit convert --filter cache,file=… leaves a cache file the next tapkit process starts warm from', async (t) => {
  const cacheFile = path.join(tempDir(t, 'tapkit-http-cachefile-'), 'disk.cache');
  const filter = `cache,size=4M,block=64K,file=${cacheFile}`;
  const out = path.join(work, 'cached.converted');
  t.teardown(() => fs.rmSync(out, { force: true }));
  const converted = await runCli(['convert', '--filter', filter, `${nginx.base}/disk.raw`, out]);
  t.is(converted.code, 0, converted.stderr);
  t.true(fs.readFileSync(out).equals(fs.readFileSync(path.join(work, 'disk.raw.expected'))));
  t.true(fs.existsSync(`${cacheFile}.index`));

  const info = await new Promise<string>((resolve, reject) => {
    execFile(process.execPath, [CLI, 'info', '--json', '--filter', filter, `${nginx.base}/disk.raw`], { encoding: 'utf8', timeout: 60_000 }, (error, stdout, stderr) => {
      if (error) reject(new Error(stderr));
      else resolve(stdout);
    });
  });
  const cache = (JSON.parse(info).chain as Array<{ provider: string; details?: Record<string, unknown> }>).find((l) => l.provider === 'cache');
  t.like(cache?.details, { cachedBlocks: 64, persistent: true });
});

test('a writable local VHD child whose parent is the image on nginx (--backing URL): writes stay local, the rest is read over http', async (t) => {
  const dir = tempDir(t, 'tapkit-http-overlay-');
  // The child is made against a local copy of the parent (the same file, so the same unique id).
  const copy = path.join(dir, 'parent-copy.vhd');
  fs.copyFileSync(path.join(root, 'disk.vhd'), copy);
  const child = path.join(dir, 'overlay.vhd');
  const made = await runCli(['vhd', 'snapshot', child, '--parent', copy]);
  t.is(made.code, 0, made.stderr);
  fs.rmSync(copy);

  const opener = new Opener({ warn: () => {}, backing: { explicit: [`${nginx.base}/disk.vhd`] } });
  const p = await opener.open(`vhd:${child}`);
  t.teardown(() => p.close());
  t.is(p.backing?.location, `${nginx.base}/disk.vhd`);
  const model = fs.readFileSync(path.join(work, 'disk.vhd.expected'));
  const servedBefore = fs.readFileSync(path.join(root, 'disk.vhd'));
  for (const [offset, length, byte] of [[4096, 8192, 0x71], [3 << 20, 65536, 0x72]] as const) {
    const bytes = Buffer.alloc(length, byte);
    await p.write!(bytes, offset, {});
    bytes.copy(model, offset);
  }
  await p.flush!();
  t.true((await readAllScattered(p, model.length)).equals(model));
  t.true(fs.readFileSync(path.join(root, 'disk.vhd')).equals(servedBefore), 'the image on the server is untouched');
});
