/** Walks a provider chain for `tapkit info`: the stack from top to source, and each backing chain. */
import type { Provider } from '../provider';
import { registry } from '../registry';

export interface Layer {
  provider: string;
  kind: string;
  location?: string;
  details?: Record<string, unknown>;
  /** The backing chain this layer opened (a qcow2 backing file, a VHD parent). */
  backing?: Layer[];
}

export function layersOf(top: Provider): Layer[] {
  const layers: Layer[] = [];
  for (let p: Provider | undefined = top; p; p = p.lower) {
    const layer: Layer = { provider: p.name, kind: registry().get(p.name)?.declaration.kind ?? 'unknown' };
    if (p.location) layer.location = p.location;
    const details = p.describe?.();
    if (details && Object.keys(details).length) layer.details = details;
    if (p.backing) layer.backing = layersOf(p.backing);
    layers.push(layer);
  }
  return layers;
}

/** The top-most format in the stack, or 'raw' for a plain source. */
export function formatOf(layers: Layer[]): string {
  return layers.find((l) => l.kind === 'format')?.provider ?? layers[layers.length - 1]?.provider ?? 'unknown';
}

export function chainText(layers: Layer[], indent = ''): string[] {
  const lines: string[] = [];
  for (const layer of layers) {
    lines.push(`${indent}${layer.provider} (${layer.kind})${layer.location ? ` ${layer.location}` : ''}`);
    if (layer.backing) {
      lines.push(`${indent}  backing:`);
      lines.push(...chainText(layer.backing, `${indent}    `));
    }
  }
  return lines;
}
