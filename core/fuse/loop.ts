/**
 * Loop devices over the exported file, through util-linux's losetup (the real tool, so
 * what tapkit does is what an administrator would type), and found again through sysfs,
 * which works even when the FUSE server behind the file is dead.
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockError } from '../errors';

export interface LoopDevice {
  device: string;
  /** Whether the loop device does direct I/O on the file (no second page cache). */
  directIo: boolean;
}

function losetup(args: string[], timeoutMs = 60_000): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('losetup', args, { timeout: timeoutMs }, (err, stdout, stderr) => {
      if (err) {
        const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
        reject(new BlockError(missing ? 'ENOENT' : 'EIO', missing ? 'losetup not found (install util-linux)' : `losetup ${args.join(' ')}: ${(stderr || err.message).trim()}`));
      } else resolve(stdout.trim());
    });
  });
}

function sysLoop(device: string, attribute: string): string | undefined {
  try {
    return fs.readFileSync(`/sys/block/${path.basename(device)}/loop/${attribute}`, 'utf8').trim();
  } catch {
    return undefined;
  }
}

/** Attaches `file` to a free loop device, with direct I/O when the file allows it. */
export async function attachLoop(file: string, options: { readOnly: boolean }): Promise<LoopDevice> {
  const base = ['--find', '--show', ...(options.readOnly ? ['--read-only'] : [])];
  let device: string;
  try {
    device = await losetup([...base, '--direct-io=on', file]);
  } catch {
    // Some kernels or files refuse direct I/O at setup; buffered loop I/O still works.
    device = await losetup([...base, file]);
  }
  return { device, directIo: sysLoop(device, 'dio') === '1' };
}

/** Loop devices whose backing file is `file` or lies under the directory `under`. */
export function loopsBackedBy(match: { file?: string; under?: string }): Array<{ device: string; file: string }> {
  let names: string[];
  try {
    names = fs.readdirSync('/sys/block').filter((n) => n.startsWith('loop'));
  } catch {
    return [];
  }
  const out: Array<{ device: string; file: string }> = [];
  for (const name of names) {
    const backing = sysLoop(name, 'backing_file')?.replace(/ \(deleted\)$/, '');
    if (!backing) continue;
    if (backing === match.file || (match.under && backing.startsWith(match.under.endsWith('/') ? match.under : `${match.under}/`))) out.push({ device: `/dev/${name}`, file: backing });
  }
  return out;
}

/**
 * Detaches a loop device. When something still holds it (a mounted file system), the
 * kernel only marks it to detach on last close; this reports that as EBUSY.
 */
export async function detachLoop(device: string, file: string): Promise<void> {
  await losetup(['--detach', device]);
  // Gone, or already bound again by someone else to another file: detached.
  if (sysLoop(device, 'backing_file')?.replace(/ \(deleted\)$/, '') === file) {
    throw new BlockError('EBUSY', `${device} is still in use (a mounted file system?); it detaches when its last user closes it`);
  }
}
