/**
 * `tapkit info` and `tapkit convert` on qcow2 images made by qemu-img: info names the
 * version, cluster size, compression, features, backing chain and snapshots; convert
 * writes the bytes qemu reads and keeps the output sparse.
 */
import test from 'ava';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createEncrypted, mixedContent, qemuImg, qemuIo, qemuRaw } from './helpers/qemu-images';
import { run } from './helpers/run';
import { tempDir } from './helpers/temp';

const CLI = path.join(__dirname, '..', 'core', 'cli', 'main.js');

function tapkit(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { timeout: 120_000, encoding: 'utf8' }, (error, stdout, stderr) => {
      resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}


test('tapkit info shows version, cluster size, compression, features, backing and snapshots', async (t) => {
  const dir = tempDir(t, 'tapkit-qcow2-');
  const base = path.join(dir, 'base.raw');
  fs.writeFileSync(base, Buffer.alloc(1024 * 1024, 1));
  const image = path.join(dir, 'img.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=16k,compression_type=zstd,lazy_refcounts=on', '-b', 'base.raw', '-F', 'raw', image, '2M']);
  await qemuIo(image, ['write -P 0x42 0 64k']);
  await qemuImg(['snapshot', '-c', 'before-upgrade', image]);
  const text = await tapkit(['info', image]);
  t.is(text.code, 0, text.stderr);
  t.regex(text.stdout, /format:\s+qcow2/);
  t.regex(text.stdout, /qcow2\.version: 3/);
  t.regex(text.stdout, /qcow2\.clusterSize: 16384/);
  t.regex(text.stdout, /qcow2\.compression: zstd/);
  t.regex(text.stdout, /qcow2\.features: .*compression type.*lazy refcounts/);
  t.regex(text.stdout, /qcow2\.backing: base\.raw/);
  t.regex(text.stdout, /qcow2\.backingFormat: raw/);
  t.regex(text.stdout, /before-upgrade/);
  t.regex(text.stdout, /backing:\n\s+raw \(source\) .*base\.raw/);

  const json = await tapkit(['info', '--json', image]);
  t.is(json.code, 0, json.stderr);
  const report = JSON.parse(json.stdout) as { chain: Array<{ details?: Record<string, unknown> }> };
  const details = report.chain[0].details!;
  t.is(details.version, 3);
  t.deepEqual((details.snapshots as Array<{ name: string }>).map((s) => s.name), ['before-upgrade']);
});

test('tapkit info refuses an encrypted image with one clear line', async (t) => {
  const dir = tempDir(t, 'tapkit-qcow2-');
  const image = path.join(dir, 'enc.qcow2');
  await createEncrypted(image, 'luks');
  const result = await tapkit(['info', image]);
  t.is(result.code, 1);
  t.regex(result.stderr, /enc\.qcow2: encrypted image \(LUKS\) is not supported/);
  t.is(result.stderr.trim().split('\n').length, 1);
});

test('tapkit convert of a compressed qcow2 with a backing file gives qemu\'s bytes, sparsely', async (t) => {
  const dir = tempDir(t, 'tapkit-qcow2-');
  const src = path.join(dir, 'src.raw');
  const content = Buffer.alloc(16 * 1024 * 1024);
  mixedContent(2 * 1024 * 1024, 5).copy(content, 0);
  fs.writeFileSync(src, content);
  const base = path.join(dir, 'base.qcow2');
  await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', src, base]);
  const top = path.join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top, '32M']);
  await qemuIo(top, ['write -P 0x99 1m 64k', 'write -P 0x98 20m 128k', 'write -z 0 64k']);
  const out = path.join(dir, 'out.raw');
  const result = await tapkit(['convert', top, out]);
  t.is(result.code, 0, result.stderr);
  const reference = await qemuRaw(top);
  t.true(fs.readFileSync(out).equals(reference), 'tapkit convert writes what qemu-img convert reads');
  const allocated = fs.statSync(out).blocks * 512;
  t.true(allocated < 4 * 1024 * 1024, `output is sparse (${allocated} bytes allocated of ${reference.length})`);
});

test('tapkit info says a dirty lazy-refcounts image is dirty, and reads it', async (t) => {
  const dir = tempDir(t, 'tapkit-qcow2-');
  const image = path.join(dir, 'dirty.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', image, '1M']);
  // Killed before it can clear the dirty bit.
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 64k', '-c', 'sigraise 9', image]);
  t.is(fs.readFileSync(image).readBigUInt64BE(72) & 1n, 1n, 'the dirty bit is set');
  const info = await tapkit(['info', image]);
  t.is(info.code, 0, info.stderr);
  t.regex(info.stdout, /qcow2\.dirty: yes \(lazy refcounts not flushed; data is sound, read-only\)/);
  const out = path.join(dir, 'out.raw');
  const convert = await tapkit(['convert', image, out]);
  t.is(convert.code, 0, convert.stderr);
  t.true(fs.readFileSync(out).equals(await qemuRaw(image)));
});
