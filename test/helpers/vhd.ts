/** Shared by the VHD tests: what real tools (qemu-img, 7zz) read from an image, and reading a disk through tapkit. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import '../../providers';
import { Opener } from '../../core/open';
import type { Provider } from '../../core/provider';
import { must } from './run';

/** The disk as `qemu-img convert -O raw` gives it. */
export async function qemuRaw(image: string, dir: string, format = 'vpc'): Promise<Buffer> {
  // A directory of its own: tests running at once may convert the same image.
  const own = fs.mkdtempSync(path.join(dir, 'qemu-'));
  const out = path.join(own, `${path.basename(image)}.raw`);
  try {
    await must('qemu-img', ['convert', '-f', format, '-O', 'raw', image, out]);
    return fs.readFileSync(out);
  } finally {
    fs.rmSync(own, { recursive: true, force: true });
  }
}

/** The disk as 7-Zip extracts it from a VHD (following parents and sector bitmaps). */
export async function sevenZipRaw(image: string, dir: string): Promise<Buffer> {
  const out = fs.mkdtempSync(path.join(dir, '7z-'));
  await must('7zz', ['x', '-y', `-o${out}`, image]);
  const files = fs.readdirSync(out);
  if (files.length !== 1) throw new Error(`7zz extracted ${files.length} files from ${image}: ${files.join(', ')}`);
  const data = fs.readFileSync(path.join(out, files[0]));
  fs.rmSync(out, { recursive: true, force: true });
  return data;
}

export async function openSpec(spec: string, readOnly = true, warn: (m: string) => void = () => {}): Promise<Provider> {
  return new Opener({ readOnly, warn }).open(spec);
}

/** Reads a whole disk through tapkit. */
export async function tapkitRaw(spec: string): Promise<Buffer> {
  const p = await openSpec(spec);
  try {
    const buf = Buffer.alloc(p.info().size);
    const chunk = 4 << 20;
    for (let at = 0; at < buf.length; at += chunk) await p.read(buf.subarray(at, Math.min(buf.length, at + chunk)), at);
    return buf;
  } finally {
    await p.close();
  }
}

/** A small deterministic PRNG (mulberry32), so a child process and the test agree on a stream. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function randomBytesFrom(next: () => number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i += 4) {
    const v = (next() * 4294967296) >>> 0;
    b[i] = v & 0xff;
    if (i + 1 < n) b[i + 1] = (v >>> 8) & 0xff;
    if (i + 2 < n) b[i + 2] = (v >>> 16) & 0xff;
    if (i + 3 < n) b[i + 3] = v >>> 24;
  }
  return b;
}

/** First differing offset of two buffers, or -1. */
export function firstDifference(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  if (a.equals(b)) return -1;
  for (let i = 0; i < a.length; i += 4096) {
    const end = Math.min(a.length, i + 4096);
    if (!a.subarray(i, end).equals(b.subarray(i, end))) {
      for (let j = i; j < end; j++) if (a[j] !== b[j]) return j;
    }
  }
  return -1;
}
