/**
 * Export kinds the daemon can attach to a device: `nbd:…`, `fuse:…`, `xen:…`. Each
 * export module registers a factory here; the daemon knows none of them by name.
 */
import { BlockError } from '../errors';
import type { Vbd } from '../vbd';
import type { Logger } from './log';

export interface ExportHandle {
  /** `nbd`, `fuse`, `xen`. */
  readonly kind: string;
  /** What a user reaches it by (a URI, a path, a xenstore path). */
  readonly target: string;
  /** A kernel block device the export made, when it made one (the fuse export's loop device). */
  readonly device?: string;
  /** Per-export counters for `stats` (connections, requests...). */
  stats?(): Record<string, unknown>;
  /** Stops serving; in-flight requests finish first. */
  close(): Promise<void>;
}

export interface ExportContext {
  /** The device id, for names and logs. */
  deviceId: string;
  log: Logger;
}

/** Builds one export of a VBD from the text after `kind:`. */
export type ExportFactory = (vbd: Vbd, argument: string, context: ExportContext) => Promise<ExportHandle>;

const factories = new Map<string, ExportFactory>();

export function registerExportKind(kind: string, factory: ExportFactory): void {
  factories.set(kind, factory);
}

export function exportKinds(): string[] {
  return [...factories.keys()].sort();
}

/** Parses `kind:argument` and starts that export. */
export async function startExport(vbd: Vbd, text: string, context: ExportContext): Promise<ExportHandle> {
  const colon = text.indexOf(':');
  const kind = colon < 0 ? text : text.slice(0, colon);
  const factory = factories.get(kind);
  if (!factory) {
    throw new BlockError('EINVAL', `unknown export '${text}' (known kinds: ${exportKinds().join(', ') || 'none'})`);
  }
  return factory(vbd, colon < 0 ? '' : text.slice(colon + 1), context);
}
