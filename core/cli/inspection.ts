/** Text for an inspection (core/inspect.ts): `tapkit info --inspect` and `tapkit check`. */
import type { Inspection, InspectedReference } from '../inspect';
import { formatSize } from '../size';

export function inspectionText(inspection: Inspection, withProblems: boolean): string[] {
  const lines: string[] = [];
  for (const image of inspection.images) {
    const indent = '  '.repeat(image.level);
    const size = image.fileSize === undefined ? '' : `, file of ${formatSize(image.fileSize)}`;
    lines.push(`${indent}${image.level === 0 ? 'image' : 'backing'}: ${image.location ?? image.spec} (${image.format}${image.probed ? ', probed' : ''}${size})`);
    if (image.error) lines.push(`${indent}  cannot read: ${image.error}`);
    if (withProblems && image.problems) {
      if (image.problems.length === 0) lines.push(`${indent}  structure: ok`);
      for (const p of image.problems) lines.push(`${indent}  problem: ${p.field}: ${p.message}`);
    }
    for (const r of image.references) lines.push(`${indent}  ${referenceText(r)}`);
  }
  lines.push(`would open: ${inspection.wouldOpen ? 'yes' : 'no'}`);
  return lines;
}

function referenceText(r: InspectedReference): string {
  const what = `${r.role}${r.source ? ` (${r.source})` : ''} '${r.name}'${r.format ? ` as ${r.format}` : ''}`;
  if (r.refused) return `${what}: refused: ${r.refused}`;
  if (r.resolved === undefined) return `${what}: not tried (an earlier candidate is used)`;
  if (r.missing) return `${what}: -> ${r.resolved} (missing)`;
  return `${what}: -> ${r.resolved}${r.chosen ? ' (used)' : ''}`;
}
