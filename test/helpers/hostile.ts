/**
 * Hostile images for the security tests, made by the real tools and then given the
 * names an attacker would plant:
 *
 *  - qcow2: `qemu-img create -u -b NAME` writes any backing name without checking it;
 *    `qemu-img rebase -u` changes it in an image that holds data.
 *  - VHD: qemu-img makes fixed and dynamic images but no differencing ones, so a child is
 *    made by tapkit's `createChild` over a qemu-made parent and its locators and parent
 *    name are then rewritten here (payloads, parent name, header checksum).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createChild } from '../../providers/vhd/create';
import { qemuImg, qemuIo } from './qemu-images';

/** A qcow2 over `backing` (any text), with `writes` by qemu-io (which then has to find the backing file). */
export async function qcow2Naming(file: string, backing: string, options: { format?: string; size?: string; writes?: string[]; cluster?: string } = {}): Promise<string> {
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${options.cluster ?? '64k'}`, '-u', '-b', backing, '-F', options.format ?? 'raw', file, options.size ?? '1M']);
  return file;
}

/** Changes the backing name of a qcow2 that may hold data, without touching the data. */
export async function rebaseUnsafe(file: string, backing: string, format = 'raw'): Promise<void> {
  await qemuImg(['rebase', '-q', '-u', '-f', 'qcow2', '-b', backing, '-F', format, file]);
}

/** A dynamic VHD made by qemu-img, with some data written by qemu-io. */
export async function vpcImage(file: string, size = '4M', writes: string[] = ['write -P 0x5a 0 96k', 'write -P 0xa5 2m 8k']): Promise<string> {
  await qemuImg(['create', '-q', '-f', 'vpc', '-o', 'subformat=dynamic', file, size]);
  if (writes.length) await qemuIo(file, writes, { format: 'vpc' });
  return file;
}

/** The VHD footer's unique id and current size (the footer at the end of the file). */
export function vhdIdentity(file: string): { uniqueId: Buffer; size: number } {
  const bytes = fs.readFileSync(file);
  const footer = bytes.subarray(bytes.length - 512);
  return { uniqueId: Buffer.from(footer.subarray(68, 84)), size: Number(footer.readBigUInt64BE(48)) };
}

/** A differencing child of `parent` (an existing VHD), empty. */
export function vhdChild(file: string, parent: string): string {
  const { uniqueId, size } = vhdIdentity(parent);
  createChild(file, { path: path.resolve(parent), uniqueId, size });
  return file;
}

function vhdSum(b: Buffer, skipAt: number): number {
  let sum = 0;
  for (let i = 0; i < b.length; i++) if (i < skipAt || i >= skipAt + 4) sum = (sum + b[i]) >>> 0;
  return ~sum >>> 0;
}

/**
 * Rewrites every parent locator (W2ru, W2ku, MacX) and the parent name of a differencing
 * VHD to name `name` (a path as a POSIX string: written with backslashes for the Windows
 * locators, as a file:// URL for MacX). Payloads must fit the space the locators have.
 */
export function plantVhdParent(file: string, name: string): void {
  const fd = fs.openSync(file, 'r+');
  try {
    const copy = Buffer.alloc(512);
    fs.readSync(fd, copy, 0, 512, 0);
    const headerAt = Number(copy.readBigUInt64BE(16));
    const header = Buffer.alloc(1024);
    fs.readSync(fd, header, 0, 1024, headerAt);
    const windows = name.replace(/\//g, '\\');
    for (let i = 0; i < 8; i++) {
      const at = 576 + i * 24;
      const code = header.toString('latin1', at, at + 4);
      let payload: Buffer;
      if (code === 'W2ru' || code === 'W2ku') payload = Buffer.from(windows, 'utf16le');
      else if (code === 'MacX') payload = Buffer.from(`file://${name}`, 'utf8');
      else continue;
      const space = Math.max(header.readUInt32BE(at + 4), 512);
      if (payload.length > space) throw new Error(`plantVhdParent: '${name}' does not fit locator ${code} (${space} bytes)`);
      header.writeUInt32BE(payload.length, at + 8);
      const dataOffset = Number(header.readBigUInt64BE(at + 16));
      const padded = Buffer.alloc(Math.ceil(payload.length / 512) * 512);
      payload.copy(padded);
      fs.writeSync(fd, padded, 0, padded.length, dataOffset);
    }
    const parentName = Buffer.alloc(512);
    Buffer.from(path.basename(name), 'utf16le').swap16().copy(parentName);
    parentName.copy(header, 64);
    header.writeUInt32BE(vhdSum(header, 36), 36);
    fs.writeSync(fd, header, 0, 1024, headerAt);
  } finally {
    fs.closeSync(fd);
  }
}
