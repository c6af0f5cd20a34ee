/**
 * VHD without opening it: the parent candidates a differencing image names
 * (`references`, for `tapkit info --inspect`) and the structural checks of layout.ts in
 * collecting mode plus the footer copy (`check`, for `tapkit check`). The parent is never
 * opened here: the inspector decides about each candidate with the backing policy.
 */
import { isBlockError } from '../../core/errors';
import type { ImageReference, StructureProblem } from '../../core/inspect';
import type { Limits } from '../../core/limits';
import type { Provider } from '../../core/provider';
import { DiskType, FOOTER_SIZE, inspectFooter } from './footer';
import { loadLayout, type Problem } from './layout';
import { parentCandidates } from './locators';

export async function vhdReferences(image: Provider, limits: Limits): Promise<ImageReference[]> {
  // Collecting mode: a damaged BAT does not hide the parent names (check reports it).
  const layout = await loadLayout(image, `vhd '${image.location ?? 'image'}'`, { collect: [], limits });
  if (layout.footer.diskType !== DiskType.Differencing || !layout.header) return [];
  const candidates = await parentCandidates(image, layout.header, layout.footerOffset, limits);
  return candidates.map((c) => ({ role: 'parent', name: c.name, format: 'vhd', source: c.source }));
}

export async function checkVhd(image: Provider, limits: Limits): Promise<StructureProblem[]> {
  const problems: Problem[] = [];
  let layout;
  try {
    layout = await loadLayout(image, `vhd '${image.location ?? 'image'}'`, { collect: problems, limits });
  } catch (e) {
    if (!isBlockError(e)) throw e;
    if (problems.length === 0) problems.push({ field: 'image', message: e.message });
    return problems;
  }
  if (layout.footer.diskType !== DiskType.Fixed && !layout.footerFromCopy) {
    const head = new Uint8Array(FOOTER_SIZE);
    await image.read(head, 0);
    const copy = inspectFooter(head);
    if (copy.problems.length) problems.push({ field: 'footer copy', message: `the footer copy at offset 0 is bad: ${copy.problems[0].message}` });
    else if (!copy.footer.uniqueId.equals(layout.footer.uniqueId) || copy.footer.currentSize !== layout.footer.currentSize) {
      problems.push({ field: 'footer copy', message: 'the footer copy at offset 0 differs from the footer at the end' });
    }
  }
  if (layout.header && layout.footer.diskType === DiskType.Differencing) {
    try {
      await parentCandidates(image, layout.header, layout.footerOffset, limits);
    } catch (e) {
      if (!isBlockError(e)) throw e;
      problems.push({ field: 'parent locator', message: e.message });
    }
  }
  return problems;
}
