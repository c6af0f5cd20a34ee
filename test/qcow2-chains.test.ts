/**
 * qcow2 backing chains that mix formats (qcow2, VHD, raw) and sources (local files, a real
 * nginx), and how they meet the backing policy (core/backing-policy.ts): names resolve on
 * the image's own server, a chain may not wander off its tree or origin unless allowed,
 * `--no-backing` and `--backing` apply to layers, and an external data file is confined
 * like a backing file but is not a layer. Every chain that opens reads byte for byte as
 * `qemu-img convert -O raw` reads the same chain from local files.
 */
import test, { type ExecutionContext } from 'ava';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockError, Opener, type OpenOptions, type Provider } from '../core';
import { startNginx, type Nginx } from './helpers/nginx';
import { mixedContent, openVbd, qemuImg, qemuIo, qemuRaw, readAll, writeBytes } from './helpers/qemu-images';
import { fileTempDir } from './helpers/temp';

const CLI = path.join(__dirname, '..', 'core', 'cli', 'main.js');
const MiB = 1024 * 1024;

function workDir(): string {
  const d = fileTempDir('tapkit-qcow2-');
  fs.chmodSync(d, 0o755);
  return d;
}

let nginx: Nginx;
let root: string;
test.before(async () => {
  root = workDir();
  nginx = await startNginx(root);
});
test.after.always(async () => {
  await nginx?.stop();
});

function opener(options: OpenOptions = {}): Opener {
  return new Opener({ readOnly: true, warn: () => {}, ...options });
}

/** Opens `spec`, reads the whole disk, and compares with qemu's bytes. */
async function assertReads(t: ExecutionContext, spec: string, reference: Buffer, options: OpenOptions = {}): Promise<Provider> {
  const vbd = await openVbd(spec, opener(options));
  t.teardown(() => vbd.close());
  t.is(vbd.info().size, reference.length, `${spec}: size`);
  t.true((await readAll(vbd, 300_000)).equals(reference), `${spec}: reads differ from qemu-img convert`);
  return vbd.top;
}

async function assertRefused(t: ExecutionContext, spec: string, code: string, message: RegExp, options: OpenOptions = {}): Promise<void> {
  const error = await t.throwsAsync(opener(options).open(spec), { instanceOf: BlockError });
  t.is(error?.code, code as BlockError['code']);
  t.regex(error?.message ?? '', message);
}

/** The chain below a provider, as [name, location] pairs, formats only. */
function chainOf(p: Provider | undefined): Array<[string, string | undefined]> {
  const out: Array<[string, string | undefined]> = [];
  for (; p; p = p.backing) out.push([p.name, p.location]);
  return out;
}

/** base.vhd (dynamic, from qemu-img) ← layers/mid.qcow2 (4 KiB clusters) ← top.qcow2, in `dir`. */
async function makeMixedChain(dir: string): Promise<string> {
  const src = path.join(dir, 'src.raw');
  fs.writeFileSync(src, mixedContent(3 * MiB, 21));
  await qemuImg(['convert', '-q', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=dynamic,force_size=on', src, path.join(dir, 'base.vhd')]);
  fs.rmSync(src);
  fs.mkdirSync(path.join(dir, 'layers'));
  const mid = path.join(dir, 'layers', 'mid.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', '../base.vhd', '-F', 'vpc', mid, '5M']);
  await qemuIo(mid, ['write -P 0x6d 100k 300k', 'write -z 1m 128k', 'write -P 0x6e 4m 4k']);
  const top = path.join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', '-b', 'layers/mid.qcow2', '-F', 'qcow2', top, '6M']);
  await qemuIo(top, ['write -P 0x70 0 64k', 'write -P 0x71 2m 192k', 'write -P 0x72 5m 64k']);
  return top;
}

test('over http: qcow2 ← qcow2 ← VHD on one nginx, each name resolved on the same server', async (t) => {
  const top = await makeMixedChain(root);
  const reference = await qemuRaw(top);
  const url = `${nginx.base}/top.qcow2`;
  for (const spec of [`qcow2:${url}`, url]) {
    const p = await assertReads(t, spec, reference);
    t.deepEqual(
      chainOf(p).map(([name]) => name),
      ['qcow2', 'qcow2', 'vhd'],
      'the chain is qcow2, qcow2, vhd',
    );
    t.deepEqual(
      chainOf(p).map(([, location]) => location),
      [url, `${nginx.base}/layers/mid.qcow2`, `${nginx.base}/base.vhd`],
      'every layer came from the server',
    );
  }
  // The CLI: convert over http writes qemu's bytes; info lists the chain on the server.
  const out = path.join(workDir(), 'out.raw');
  const convert = await tapkit(['convert', url, out]);
  t.is(convert.code, 0, convert.stderr);
  t.true(fs.readFileSync(out).equals(reference), 'tapkit convert over http writes what qemu reads locally');
  const info = await tapkit(['info', url]);
  t.is(info.code, 0, info.stderr);
  t.regex(info.stdout, /vhd \(format\) http:\/\/127\.0\.0\.1:\d+\/base\.vhd/);
});

test('over http: a raw backing file, an absolute name on the same server; file:// and other origins are refused', async (t) => {
  // The usual cloud layout: a qcow2 overlay on a raw base, both on the web server.
  const base = path.join(root, 'cloud-base.raw');
  fs.writeFileSync(base, mixedContent(2 * MiB, 55));
  const overlay = path.join(root, 'cloud.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'cloud-base.raw', '-F', 'raw', overlay, '3M']);
  await qemuIo(overlay, ['write -P 0x43 0 64k', 'write -z 1m 64k']);
  const p = await assertReads(t, `${nginx.base}/cloud.qcow2`, await qemuRaw(overlay));
  t.deepEqual(chainOf(p), [['qcow2', `${nginx.base}/cloud.qcow2`], ['http', `${nginx.base}/cloud-base.raw`]], 'a raw backing file is the bare http object, not probed');

  // An absolute name under a URL image is a path on the same server, never a local file.
  fs.mkdirSync(path.join(root, 'abs'));
  fs.writeFileSync(path.join(root, 'abs', 'base.raw'), Buffer.alloc(2 * MiB, 0x42));
  const absolute = path.join(root, 'absolute.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', absolute, '2M']);
  await qemuIo(absolute, ['write -P 0x44 0 64k']);
  await qemuImg(['rebase', '-q', '-u', '-f', 'qcow2', '-b', '/abs/base.raw', '-F', 'raw', absolute]);
  const expected = Buffer.alloc(2 * MiB, 0x42);
  expected.fill(0x44, 0, 64 * 1024);
  const q = await assertReads(t, `${nginx.base}/absolute.qcow2`, expected);
  t.is(q.backing?.location, `${nginx.base}/abs/base.raw`);

  for (const [file, name, refusal] of [
    ['to-file.qcow2', `file://${base}`, /a URL image may not reach a local file/],
    ['to-away.qcow2', `http://198.51.100.7:${nginx.port}/cloud-base.raw`, /URL images may only reach their own origin/],
  ] as const) {
    await qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', name, '-F', 'raw', path.join(root, file), '2M']);
    await assertRefused(t, `${nginx.base}/${file}`, 'EACCES', refusal);
  }
});

test('local chains: qcow2 over a dynamic VHD (probed) and a fixed VHD (named vpc) read as qemu does', async (t) => {
  const dir = workDir();
  const src = path.join(dir, 'src.raw');
  fs.writeFileSync(src, mixedContent(2 * MiB, 33));
  for (const subformat of ['dynamic', 'fixed']) {
    const vhd = path.join(dir, `${subformat}.vhd`);
    await qemuImg(['convert', '-q', '-f', 'raw', '-O', 'vpc', '-o', `subformat=${subformat},force_size=on`, src, vhd]);
    const top = path.join(dir, `over-${subformat}.qcow2`);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=32k', '-b', `${subformat}.vhd`, '-F', 'vpc', top, '3M']);
    await qemuIo(top, ['write -P 0x1f 96k 40k', 'write -z 1m 64k']);
    if (subformat === 'dynamic') {
      // Hide the backing-format extension: the dynamic VHD is then found by probing (qemu probes it too).
      const at = fs.readFileSync(top).indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]), 104);
      t.true(at > 0);
      writeBytes(top, at, Buffer.from([0x7a, 0x7a, 0x7a, 0x7a]));
    }
    const p = await assertReads(t, top, await qemuRaw(top));
    t.is(p.backing?.name, 'vhd', `${subformat} VHD opened as vhd`);
  }
});

test('local policy: a backing file outside the tree is refused; --allow-backing, --no-backing and --backing act on qcow2 chains', async (t) => {
  const dir = workDir();
  fs.mkdirSync(path.join(dir, 'images'));
  fs.mkdirSync(path.join(dir, 'elsewhere'));
  const outside = path.join(dir, 'elsewhere', 'base.raw');
  fs.writeFileSync(outside, Buffer.alloc(2 * MiB, 0x0e));
  const image = path.join(dir, 'images', 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', '../elsewhere/base.raw', '-F', 'raw', image, '2M']);
  await qemuIo(image, ['write -P 0x0f 64k 64k']);
  const reference = await qemuRaw(image);

  await assertRefused(t, image, 'EACCES', /outside the image's directory tree.*names backing file '\.\.\/elsewhere\/base\.raw'/);
  await assertReads(t, image, reference, { backing: { allow: [path.join(dir, 'elsewhere')] } });
  await assertRefused(t, image, 'EACCES', /--no-backing/, { backing: { noBacking: true, allow: [path.join(dir, 'elsewhere')] } });

  // --backing names the layer instead of the image: qemu reads the same after `rebase -u` onto it.
  const chosen = path.join(dir, 'chosen.raw');
  fs.writeFileSync(chosen, mixedContent(2 * MiB, 44));
  const rebased = path.join(dir, 'rebased.qcow2');
  fs.copyFileSync(image, rebased);
  await qemuImg(['rebase', '-q', '-u', '-f', 'qcow2', '-b', chosen, '-F', 'raw', rebased]);
  const p = await assertReads(t, image, await qemuRaw(rebased), { backing: { explicit: [`raw:${chosen}`] } });
  t.is(p.backing?.location, chosen);

  // A chain deeper than the levels given is refused.
  const deeper = path.join(dir, 'images', 'deeper.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'top.qcow2', '-F', 'qcow2', deeper]);
  await assertRefused(t, deeper, 'EACCES', /--backing names 1 level\(s\), the image names more/, { backing: { explicit: [image] } });
});

test('an external data file is confined like a backing file, but --no-backing and --backing leave it alone', async (t) => {
  const dir = workDir();
  fs.mkdirSync(path.join(dir, 'images'));
  fs.mkdirSync(path.join(dir, 'elsewhere'));
  // Inside the tree: opens under --no-backing (the image has no backing file).
  const inside = path.join(dir, 'images', 'inside.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${path.join(dir, 'images', 'inside.data')}`, inside, '2M']);
  await qemuIo(inside, ['write -P 0x1d 0 128k']);
  const insideRef = await qemuRaw(inside);
  await assertReads(t, inside, insideRef);
  await assertReads(t, inside, insideRef, { backing: { noBacking: true } });

  // Outside the tree: refused, naming the data file; allowed with --allow-backing.
  const away = path.join(dir, 'images', 'away.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${path.join(dir, 'elsewhere', 'away.data')}`, away, '2M']);
  await qemuIo(away, ['write -P 0x1e 0 128k']);
  await assertRefused(t, away, 'EACCES', /names data file '.*away\.data'/);
  await assertReads(t, away, await qemuRaw(away), { backing: { allow: [path.join(dir, 'elsewhere')] } });

  // A data file and a backing file: --backing replaces the backing layer only.
  const base = path.join(dir, 'images', 'base.raw');
  fs.writeFileSync(base, Buffer.alloc(2 * MiB, 0x2b));
  const both = path.join(dir, 'images', 'both.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${path.join(dir, 'images', 'both.data')}`, '-b', 'base.raw', '-F', 'raw', both, '2M']);
  await qemuIo(both, ['write -P 0x2c 64k 64k']);
  const reference = await qemuRaw(both);
  const p = await assertReads(t, both, reference, { backing: { explicit: [`raw:${base}`] } });
  t.is(p.backing?.location, base);
});

test('a chain twelve qcow2 images deep reads as qemu does; a chain deeper than the limit is refused naming it', async (t) => {
  const dir = workDir();
  let previous = 'base.raw';
  fs.writeFileSync(path.join(dir, previous), Buffer.alloc(2 * MiB, 0x01));
  for (let level = 1; level <= 12; level++) {
    const name = `level-${level}.qcow2`;
    // Alternating formats of the layers themselves: v2 and v3, 4 KiB and 64 KiB clusters.
    const options = level % 2 ? 'compat=0.10,cluster_size=4k' : 'compat=1.1,cluster_size=64k';
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', options, '-b', previous, '-F', previous.endsWith('.raw') ? 'raw' : 'qcow2', path.join(dir, name), '2M']);
    await qemuIo(path.join(dir, name), [`write -P ${level + 16} ${level * 100}k ${level * 4}k`, `write -z ${level * 150}k 4k`]);
    previous = name;
  }
  const top = path.join(dir, previous);
  const p = await assertReads(t, top, await qemuRaw(top));
  t.is(chainOf(p).length, 13, 'twelve qcow2 layers and the raw base');
  await assertRefused(t, top, 'ELOOP', /backing chain deeper than 8 \(limit chain-depth; raise it with --max-chain-depth N\)/, { maxChainDepth: 8 });
});

function tapkit(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { timeout: 120_000, encoding: 'utf8' }, (error, stdout, stderr) => {
      resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}
