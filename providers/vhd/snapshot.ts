/**
 * Snapshots: a new differencing child on top of a VHD, after which the old image is the
 * child's read-only parent and every new write goes to the child.
 *
 * Two entry points:
 * - `snapshotVhd(parentPath, childPath)` for an image nobody has open for writing
 *   (`tapkit vhd snapshot`);
 * - `snapshotOpenVhd(parent, childPath)` for an image that is live in this process (the
 *   daemon's `snapshot` op): it flushes the open image first, so its BAT, bitmaps and
 *   data are on disk before the child starts naming it. The caller must keep new writes
 *   away from the parent from that moment on (pause the device) and then reopen the
 *   device on the child.
 *
 * The child gets the parent's size and, by default, its block size; its locators name the
 * parent relative to the child's directory (W2ru, MacX) and absolutely (W2ku).
 */
import * as path from 'node:path';
import { BlockError } from '../../core/errors';
import { Opener } from '../../core/open';
import { createChild } from './create';
import { DiskType } from './footer';
import { VhdProvider } from './provider';
import { uuidText } from './uuid';

export interface SnapshotOptions {
  /** Block size of the child (default: the parent's, or 2 MiB under a fixed parent). */
  blockSize?: number;
}

export interface SnapshotResult {
  /** Absolute paths. */
  child: string;
  parent: string;
  /** The parent's unique id, as recorded in the child's header. */
  parentUniqueId: string;
}

/** Creates `childPath` over the VHD at `parentPath` (which nobody may be writing). */
export async function snapshotVhd(parentPath: string, childPath: string, options: SnapshotOptions = {}, opener: Opener = new Opener({ readOnly: true })): Promise<SnapshotResult> {
  const parent = await opener.open(`vhd:${parentPath}`);
  try {
    if (!(parent instanceof VhdProvider)) throw new BlockError('EINVAL', `${parentPath} is not a VHD (it opened as ${parent.name})`);
    return await snapshotOpenVhd(parent, childPath, options);
  } finally {
    await parent.close();
  }
}

/** Creates `childPath` over an open VHD, flushing it first (see the module comment). */
export async function snapshotOpenVhd(parent: VhdProvider, childPath: string, options: SnapshotOptions = {}): Promise<SnapshotResult> {
  const parentPath = parent.location;
  if (!parentPath || !path.isAbsolute(parentPath)) {
    throw new BlockError('EINVAL', `the parent ${parentPath ?? '(no location)'} is not a local file, so a child cannot name it`);
  }
  await parent.flush();
  const child = path.resolve(childPath);
  createChild(
    child,
    {
      path: parentPath,
      uniqueId: parent.uniqueId,
      size: parent.info().size,
      blockSize: parent.type === DiskType.Fixed ? undefined : parent.blockSize,
    },
    options.blockSize,
  );
  return { child, parent: parentPath, parentUniqueId: uuidText(parent.uniqueId) };
}
