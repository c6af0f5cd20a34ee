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
import { mixedContent, qemuImg, qemuIo, qemuRaw, tempDir } from './helpers/qemu-images';

const dir = tempDir('tapkit-qcow2-conformance-');
test.after.always(() => fs.rmSync(dir, { recursive: true, force: true }));

/** The images are made once, when the suite registers its tests. */
function chain(): string {
  const base = path.join(dir, 'base.raw');
  fs.writeFileSync(base, mixedContent(3 * 1024 * 1024, 61));
  const src = path.join(dir, 'mid-src.raw');
  fs.writeFileSync(src, mixedContent(4 * 1024 * 1024, 62));
  const mid = path.join(dir, 'mid.qcow2');
  // A compressed middle layer: convert -c, then rebase it onto the raw base (unsafe: contents as they are).
  qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd,cluster_size=16k', src, mid]);
  qemuIo(mid, ['discard 0 1m', 'write -z 1m 64k']);
  qemuImg(['rebase', '-q', '-u', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', mid]);
  fs.rmSync(src);
  const top = path.join(dir, 'top.qcow2');
  qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-b', 'mid.qcow2', '-F', 'qcow2', top, '5M']);
  qemuIo(top, ['write -P 0x71 2k 6k', 'write -z 200k 4k', 'write -z -u 2m 128k', 'write -P 0x72 4m 100k']);
  return top;
}

function v2Small(): string {
  const src = path.join(dir, 'v2-src.raw');
  fs.writeFileSync(src, mixedContent(2 * 1024 * 1024 + 512, 63));
  const image = path.join(dir, 'v2.qcow2');
  qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compat=0.10,cluster_size=512', src, image]);
  qemuIo(image, ['write -P 0x55 1000k 3k']);
  fs.rmSync(src);
  return image;
}

function snapshotted(): string {
  const image = path.join(dir, 'snap.qcow2');
  qemuImg(['create', '-q', '-f', 'qcow2', image, '2M']);
  qemuIo(image, ['write -P 0x0a 0 1536k']);
  qemuImg(['snapshot', '-c', 'golden', image]);
  qemuIo(image, ['write -P 0x0b 512k 1m', 'discard 0 64k']);
  return image;
}

function expectedFrom(bytes: Buffer): (offset: number, length: number) => Uint8Array {
  return (offset, length) => bytes.subarray(offset, offset + length);
}

const top = chain();
runConformance(test, { name: 'qcow2 chain (extended L2 ← zstd ← raw)', open: () => `qcow2:${top}`, readOnly: true, expected: expectedFrom(qemuRaw(top)) });

const v2 = v2Small();
runConformance(test, { name: 'qcow2 v2, 512-byte clusters, zlib', open: () => v2, readOnly: true, expected: expectedFrom(qemuRaw(v2)) });

const snap = snapshotted();
runConformance(test, {
  name: 'qcow2 internal snapshot',
  open: () => `qcow2,snapshot=golden:${snap}`,
  readOnly: true,
  expected: expectedFrom(qemuRaw(snap, ['-l', 'snapshot.name=golden'])),
});
