/**
 * Reading the mount table (/proc/self/mountinfo) and aborting a FUSE connection through
 * fusectl, without touching the FUSE mount itself: a stat of a mount whose server is
 * dead or stuck would fail or hang, and the server must never stat its own mount.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockError } from '../errors';
import { mount } from '../../native/mount';

export interface MountEntry {
  mountId: number;
  major: number;
  minor: number;
  mountpoint: string;
  fstype: string;
  source: string;
}

const FUSECTL_DIR = '/sys/fs/fuse/connections';

/** Undoes mountinfo's octal escapes (\040 for a space, ...). */
function unescape(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

export function readMounts(): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    if (!line) continue;
    const fields = line.split(' ');
    const dash = fields.indexOf('-');
    if (dash < 0) continue;
    const [major, minor] = fields[2].split(':').map(Number);
    out.push({ mountId: Number(fields[0]), major, minor, mountpoint: unescape(fields[4]), fstype: fields[dash + 1], source: unescape(fields[dash + 2] ?? '') });
  }
  return out;
}

/** The topmost mount at `mountpoint` (an absolute, resolved path), if any. */
export function findMount(mountpoint: string): MountEntry | undefined {
  const matches = readMounts().filter((m) => m.mountpoint === mountpoint);
  return matches[matches.length - 1];
}

/**
 * The fusectl connection number of a FUSE mount: the device number of its superblock,
 * as the kernel encodes it
 * (for FUSE, major 0, that is the minor).
 */
export function connectionOf(entry: MountEntry): number {
  // The kernel's dev_t: major in the bits above 20, minor below.
  return entry.major * 2 ** 20 + entry.minor;
}

/** Mounts fusectl on /sys/fs/fuse/connections when it is not mounted yet. */
export function ensureFusectl(): void {
  if (readMounts().some((m) => m.fstype === 'fusectl')) return;
  try {
    mount('fusectl', FUSECTL_DIR, 'fusectl', 0, null);
  } catch (e) {
    throw new BlockError('ENODEV', `cannot mount fusectl on ${FUSECTL_DIR} to abort a FUSE connection: ${(e as Error).message}`);
  }
}

/**
 * Aborts a FUSE connection: every waiting and future request on it fails (ENOTCONN),
 * the server's reads end, and processes using the mount get errors instead of hanging.
 * Returns false when the connection no longer exists.
 */
export function abortConnection(connection: number): boolean {
  ensureFusectl();
  const file = path.join(FUSECTL_DIR, String(connection), 'abort');
  try {
    fs.writeFileSync(file, '1');
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw new BlockError('EIO', `cannot abort FUSE connection ${connection}: ${(e as Error).message}`);
  }
}
