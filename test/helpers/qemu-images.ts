/**
 * Test images made by the real tools (qemu-img, qemu-io), and the reference bytes
 * `qemu-img convert -O raw` gives for them. Every tool runs through ./run (async, bounded by a timeout).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import '../../providers';
import { Opener, Vbd, type Provider } from '../../core';
import { must } from './run';

export function qemuImg(args: string[], cwd?: string): Promise<string> {
  return must('qemu-img', args, { cwd });
}

/** qemu-io on a qcow2 image with a list of commands (`write -P 0x11 0 64k`, ...). */
export function qemuIo(image: string, commands: string[], options: { format?: string; cwd?: string } = {}): Promise<string> {
  const args = ['-f', options.format ?? 'qcow2'];
  for (const c of commands) args.push('-c', c);
  args.push(image);
  return must('qemu-io', args, { cwd: options.cwd });
}

/** The bytes qemu reads from an image (`qemu-img convert -O raw`), extra convert args allowed. */
export async function qemuRaw(image: string, extra: string[] = [], cwd?: string): Promise<Buffer> {
  const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-ref-')), 'ref.raw');
  try {
    await qemuImg(['convert', ...extra, '-O', 'raw', image, out], cwd);
    return fs.readFileSync(out);
  } finally {
    fs.rmSync(path.dirname(out), { recursive: true, force: true });
  }
}

export async function openVbd(spec: string, opener: Opener = new Opener({ readOnly: true, warn: () => {} })): Promise<Vbd> {
  const top: Provider = await opener.open(spec);
  return new Vbd(top, { name: spec });
}

/** Reads a whole disk through a VBD in chunks of `chunk` bytes (odd sizes test misaligned reads). */
export async function readAll(vbd: Vbd, chunk = 1 << 20): Promise<Buffer> {
  const size = vbd.info().size;
  const out = Buffer.alloc(size);
  for (let offset = 0; offset < size; offset += chunk) {
    await vbd.read(out.subarray(offset, Math.min(size, offset + chunk)), offset);
  }
  return out;
}

/** Deterministic bytes: half compressible text, half noise, so `convert -c` stores both kinds. */
export function mixedContent(size: number, seed = 1): Buffer {
  const buf = Buffer.alloc(size);
  let x = seed >>> 0 || 1;
  const noise = () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x & 0xff;
  };
  const block = 24 * 1024;
  for (let at = 0; at < size; at += block) {
    const kind = (at / block) % 4;
    const end = Math.min(size, at + block);
    if (kind === 0) buf.write(`block at ${at}: the quick brown fox jumps over the lazy dog. `.repeat(1 + block / 48), at, end - at, 'latin1');
    else if (kind === 1) for (let i = at; i < end; i++) buf[i] = noise();
    else if (kind === 2) continue; // zeros
    else buf.fill(at & 0xff, at, end);
  }
  return buf;
}

/** Reads the header fields the corruption tests redirect. */
export function headerFields(image: string): { clusterBits: number; l1Offset: number; l1Size: number } {
  const fd = fs.openSync(image, 'r');
  try {
    const h = Buffer.alloc(72);
    fs.readSync(fd, h, 0, 72, 0);
    return { clusterBits: h.readUInt32BE(20), l1Offset: Number(h.readBigUInt64BE(40)), l1Size: h.readUInt32BE(36) };
  } finally {
    fs.closeSync(fd);
  }
}

export function readU64(file: string, offset: number): bigint {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(8);
    fs.readSync(fd, b, 0, 8, offset);
    return b.readBigUInt64BE(0);
  } finally {
    fs.closeSync(fd);
  }
}

export function writeU64(file: string, offset: number, value: bigint): void {
  const fd = fs.openSync(file, 'r+');
  try {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(value, 0);
    fs.writeSync(fd, b, 0, 8, offset);
  } finally {
    fs.closeSync(fd);
  }
}

export function writeBytes(file: string, offset: number, bytes: Uint8Array): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * An encrypted qcow2 (`aes` or `luks`). LUKS creation times its key derivation, and
 * qemu-img fails with "Unable to get accurate CPU usage" when the machine is busy: retry.
 */
export async function createEncrypted(image: string, format: 'aes' | 'luks', size = '1M'): Promise<void> {
  // A short key-derivation time keeps LUKS creation to a few seconds of CPU (the default is 2 s of PBKDF2 per slot, plus its timing runs).
  const kdf = format === 'luks' ? ',encrypt.iter-time=10' : '';
  const args = ['create', '-q', '-f', 'qcow2', '--object', 'secret,id=sec0,data=s3cr3t', '-o', `encrypt.format=${format},encrypt.key-secret=sec0${kdf}`, image, size];
  for (let attempt = 1; ; attempt++) {
    try {
      await qemuImg(args);
      return;
    } catch (e) {
      if (attempt >= 5 || !/accurate CPU usage/.test((e as Error).message)) throw e;
      fs.rmSync(image, { force: true });
    }
  }
}
