/**
 * `tapkit vhd check`: every problem of an image, not just the first. Walks the layout in
 * collecting mode, compares the footer copy, reads every bitmap, and for a differencing
 * image opens its parent chain.
 */
import { BlockError } from '../../core/errors';
import { Opener } from '../../core/open';
import type { Provider } from '../../core/provider';
import { DiskType, FOOTER_SIZE, inspectFooter } from './footer';
import { loadLayout, UNALLOCATED, type Problem, type VhdLayout } from './layout';

export interface CheckReport {
  problems: Problem[];
  layout?: VhdLayout;
  /** Bytes inside the file used by no structure (blocks a killed writer allocated, freed blocks). */
  unreferencedBytes?: number;
}

/** `opener` (read-only) opens the image and, for a differencing image, its parents. */
export async function checkImage(file: string, opener: Opener = new Opener({ readOnly: true })): Promise<CheckReport> {
  const problems: Problem[] = [];
  let source: Provider;
  try {
    source = await opener.open(`raw:${file}`);
  } catch (e) {
    return { problems: [{ field: 'file', message: (e as Error).message }] };
  }
  let layout: VhdLayout | undefined;
  let unreferencedBytes: number | undefined;
  try {
    try {
      layout = await loadLayout(source, file, { collect: problems });
    } catch (e) {
      if (!(e instanceof BlockError)) throw e;
      if (problems.length === 0) problems.push({ field: 'image', message: e.message });
    }
    if (layout && layout.footer.diskType !== DiskType.Fixed) {
      const head = Buffer.alloc(FOOTER_SIZE);
      await source.read(head, 0);
      const copy = inspectFooter(head);
      if (!layout.footerFromCopy) {
        if (copy.problems.length) problems.push({ field: 'footer copy', message: `the footer copy at offset 0 is bad: ${copy.problems[0].message}` });
        else if (!sameFooter(copy.footer, layout.footer)) problems.push({ field: 'footer copy', message: 'the footer copy at offset 0 differs from the footer at the end' });
      }
      const bat = layout.bat!;
      for (let i = 0; i < bat.length; i++) {
        if (bat[i] === UNALLOCATED) continue;
        try {
          await source.read(new Uint8Array(layout.bitmapBytes), bat[i] * 512);
        } catch (e) {
          problems.push({ field: `bat[${i}]`, message: `cannot read the bitmap of block ${i}: ${(e as Error).message}` });
        }
      }
      unreferencedBytes = Math.max(0, layout.footerOffset - layout.dataEnd);
    }
    if (layout && layout.footer.diskType === DiskType.Differencing && problems.length === 0) {
      try {
        const chain = await opener.open(`vhd:${file}`);
        await chain.close();
      } catch (e) {
        problems.push({ field: 'parent', message: (e as Error).message });
      }
    }
  } finally {
    await source.close();
  }
  return { problems, layout, unreferencedBytes };
}

function sameFooter(a: ReturnType<typeof inspectFooter>['footer'], b: ReturnType<typeof inspectFooter>['footer']): boolean {
  return a.currentSize === b.currentSize && a.diskType === b.diskType && a.dataOffset === b.dataOffset && a.uniqueId.equals(b.uniqueId);
}
