/**
 * The provider conformance suite (test/conformance.ts), read-only, over qcow2 images made
 * by qemu-img and qemu-io, with qemu's own bytes (`qemu-img convert -O raw`) as the
 * expected contents: a chain over a raw base with zstd-compressed clusters, extended L2
 * subclusters and zero clusters; a version 2 image with 512-byte clusters and zlib; an
 * internal snapshot.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import '../providers';
import { runConformance } from './conformance';
import { mixedContent, qemuImg, qemuIo, qemuRaw } from './helpers/qemu-images';
import { fileTempDir } from './helpers/temp';

const dir = fileTempDir('tapkit-qcow2-conformance-');

async function chain(): Promise<string> {
  const base = path.join(dir, 'base.raw');
  fs.writeFileSync(base, mixedContent(3 * 1024 * 1024, 61));
  const src = path.join(dir, 'mid-src.raw');
  fs.writeFileSync(src, mixedContent(4 * 1024 * 1024, 62));
  const mid = path.join(dir, 'mid.qcow2');
  // A compressed middle layer: convert -c, then rebase it onto the raw base (unsafe: contents as they are).
  await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd,cluster_size=16k', src, mid]);
  await qemuIo(mid, ['discard 0 1m', 'write -z 1m 64k']);
  await qemuImg(['rebase', '-q', '-u', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', mid]);
  fs.rmSync(src);
  const top = path.join(dir, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-b', 'mid.qcow2', '-F', 'qcow2', top, '5M']);
  await qemuIo(top, ['write -P 0x71 2k 6k', 'write -z 200k 4k', 'write -z -u 2m 128k', 'write -P 0x72 4m 100k']);
  return top;
}

async function v2Small(): Promise<string> {
  const src = path.join(dir, 'v2-src.raw');
  fs.writeFileSync(src, mixedContent(2 * 1024 * 1024 + 512, 63));
  const image = path.join(dir, 'v2.qcow2');
  await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compat=0.10,cluster_size=512', src, image]);
  await qemuIo(image, ['write -P 0x55 1000k 3k']);
  fs.rmSync(src);
  return image;
}

async function snapshotted(): Promise<string> {
  const image = path.join(dir, 'snap.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', image, '2M']);
  await qemuIo(image, ['write -P 0x0a 0 1536k']);
  await qemuImg(['snapshot', '-c', 'golden', image]);
  await qemuIo(image, ['write -P 0x0b 512k 1m', 'discard 0 64k']);
  return image;
}

/** Made once in test.before (tests are declared synchronously, the tools run asynchronously): image and qemu's bytes for it. */
const made = new Map<string, { image: string; reference: Buffer }>();

/** Registers the suite over the image `make` gives, with `qemu-img convert -O raw` (plus `extra` args) as the expected contents. */
function conformanceOver(name: string, make: () => Promise<string>, spec: (image: string) => string, extra: string[] = []): void {
  test.before(async () => {
    const image = await make();
    made.set(name, { image, reference: await qemuRaw(image, extra) });
  });
  runConformance(test, {
    name,
    readOnly: true,
    open: () => spec(made.get(name)!.image),
    expected: (offset, length) => made.get(name)!.reference.subarray(offset, offset + length),
  });
}

conformanceOver('qcow2 chain (extended L2 ← zstd ← raw)', chain, (top) => `qcow2:${top}`);
conformanceOver('qcow2 v2, 512-byte clusters, zlib', v2Small, (v2) => v2);
conformanceOver('qcow2 internal snapshot', snapshotted, (snap) => `qcow2,snapshot=golden:${snap}`, ['-l', 'snapshot.name=golden']);
