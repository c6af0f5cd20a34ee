/** Shared by the VHD tests: real tools (qemu-img, 7zz) with timeouts, and reading a disk through tapkit. */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import '../../providers';
import { Opener } from '../../core/open';
import type { Provider } from '../../core/provider';

const execFileP = promisify(execFile);

export const CLI = path.join(__dirname, '..', '..', 'core', 'cli', 'main.js');

export function tempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `tapkit-${prefix}-`));
}

/** Runs a tool with a hard timeout; rejects with its stderr on failure. */
export async function tool(cmd: string, args: string[], timeoutMs = 60_000): Promise<string> {
  try {
    const { stdout } = await execFileP(cmd, args, { timeout: timeoutMs, maxBuffer: 64 << 20, killSignal: 'SIGKILL' });
    return stdout;
  } catch (e) {
    const err = e as Error & { stderr?: string; code?: unknown };
    throw new Error(`${cmd} ${args.join(' ')} failed (${err.code}): ${err.stderr ?? err.message}`);
  }
}

export async function tapkit(args: string[], timeoutMs = 60_000): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileP(process.execPath, [CLI, ...args], { timeout: timeoutMs, killSignal: 'SIGKILL' });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as Error & { stdout?: string; stderr?: string; code?: number };
    if (typeof err.code !== 'number') throw e;
    return { code: err.code, stdout: err.stdout ?? '', stderr: err.stderr ?? '' };
  }
}

/** The disk as `qemu-img convert -O raw` gives it. */
export async function qemuRaw(image: string, dir: string, format = 'vpc'): Promise<Buffer> {
  const out = path.join(dir, `${path.basename(image)}.qemu.raw`);
  await tool('qemu-img', ['convert', '-f', format, '-O', 'raw', image, out]);
  const data = fs.readFileSync(out);
  fs.rmSync(out);
  return data;
}

/** The disk as 7-Zip extracts it from a VHD (following parents and sector bitmaps). */
export async function sevenZipRaw(image: string, dir: string): Promise<Buffer> {
  const out = fs.mkdtempSync(path.join(dir, '7z-'));
  await tool('7zz', ['x', '-y', `-o${out}`, image]);
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
