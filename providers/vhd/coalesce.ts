/**
 * Merging a differencing child into its parent: every sector the child holds is written
 * into the parent, then the parent is flushed. The parent only changes in sectors the
 * child overrides, so the chain reads the same at every instant and an interrupted merge
 * is simply run again. Afterwards the child adds nothing and may be deleted (any other
 * child of the same parent is invalidated by the merge, as with vhd-util).
 */
import { BlockError } from '../../core/errors';
import { Opener } from '../../core/open';
import { isUrl } from '../../core/resolve';
import { DiskType } from './footer';
import { VhdProvider } from './provider';

const CHUNK = 1 << 20;

/** `readOnly` opens the child and its chain; `writable` opens the parent for the merge. */
export async function coalesceChild(
  childFile: string,
  readOnly: Opener = new Opener({ readOnly: true }),
  writable: Opener = new Opener({}),
): Promise<{ parent: string; mergedBytes: number }> {
  const child = await readOnly.open(`vhd:${childFile}`);
  try {
    if (!(child instanceof VhdProvider) || child.type !== DiskType.Differencing) {
      throw new BlockError('EINVAL', `${childFile} is not a differencing VHD: there is nothing to coalesce`);
    }
    const parentLocation = child.backing?.location;
    if (!parentLocation || isUrl(parentLocation)) {
      throw new BlockError('EINVAL', `${childFile}: its parent (${parentLocation ?? 'unknown'}) is not a local file that can be written`);
    }
    const parent = await writable.open(`vhd:${parentLocation}`);
    let mergedBytes = 0;
    try {
      if (parent.info().size < child.info().size) {
        throw new BlockError('EINVAL', `${childFile} (${child.info().size} bytes) is larger than its parent ${parentLocation} (${parent.info().size} bytes); grow the parent first`);
      }
      const buf = Buffer.alloc(CHUNK);
      for await (const [offset, length] of child.ownRuns()) {
        for (let done = 0; done < length; done += CHUNK) {
          const view = buf.subarray(0, Math.min(CHUNK, length - done));
          await child.read(view, offset + done);
          await parent.write!(view, offset + done, {});
          mergedBytes += view.length;
        }
      }
      await parent.flush!();
    } finally {
      await parent.close();
    }
    return { parent: parentLocation, mergedBytes };
  } finally {
    await child.close();
  }
}
