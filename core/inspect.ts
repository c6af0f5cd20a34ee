/**
 * Inspection without trust: what a spec *would* open, found by reading metadata only.
 * For each image in the chain: its format (named or probed), the files it names
 * (backing file, data file, VHD parent candidates), and for each name what the backing
 * policy decides: the target it resolves to, or the rule that refuses it. Only images
 * the policy allows are read (their headers, to follow the chain); a refused name is
 * never touched. With `check`, each image's structural checks run too (`tapkit check`).
 *
 * Nothing is served and no format is opened: a format declares `references` and
 * `check` hooks (core/registry.ts) that read the image's bytes through its source.
 */
import * as fs from 'node:fs';
import { BackingPolicy, chainIdentity } from './backing-policy';
import { isBlockError } from './errors';
import { Opener, type OpenOptions } from './open';
import type { Provider } from './provider';
import { redactSpec, redactUrl } from './redact';
import { registry, type RegisteredProvider } from './registry';
import { parseSpec } from './spec';
import { isUrl } from './resolve';

/** A file an image names, as its metadata says. */
export interface ImageReference {
  /** `backing` (qcow2), `data-file` (qcow2 external data), `parent` (VHD). */
  role: 'backing' | 'data-file' | 'parent';
  name: string;
  /** The format the image says the file has; absent: probed. */
  format?: string;
  /** Where the name came from when there are several (a VHD locator code, 'parent name'). */
  source?: string;
}

export interface StructureProblem {
  /** The structure at fault (`l1_table[3]`, `bat[17]`, `header_length`). */
  field: string;
  message: string;
}

export interface InspectedReference extends ImageReference {
  /** The target the policy lets it open (a path, a URL, the operator's --backing spec). */
  resolved?: string;
  /** Why it would not be opened: the policy's rule, a limit, a loop. */
  refused?: string;
  /** The resolved file does not exist (a VHD then tries its next candidate). */
  missing?: boolean;
  /** For alternatives (VHD parent candidates): the one the open would use. */
  chosen?: boolean;
}

export interface InspectedImage {
  level: number;
  spec: string;
  location?: string;
  /** The format named or probed; `raw` when none matched. */
  format: string;
  probed: boolean;
  /** Bytes of the image file (or object), not the virtual disk. */
  fileSize?: number;
  references: InspectedReference[];
  /** Metadata that could not be read (the image itself is damaged or refused). */
  error?: string;
  /** With `check`: structural problems, [] when sound; absent when the format has no checks. */
  problems?: StructureProblem[];
}

export interface Inspection {
  images: InspectedImage[];
  /** True when every reference resolves and no image failed: the open would get past the policy. */
  wouldOpen: boolean;
}

export interface InspectOptions extends OpenOptions {
  /** Run each format's structural checks too. */
  check?: boolean;
}

const PROBE_BYTES = 65536;

export class Inspector {
  private readonly opener: Opener;
  private readonly policy: BackingPolicy;

  constructor(private readonly options: InspectOptions = {}) {
    this.opener = new Opener({ ...options, readOnly: true, filters: [] });
    this.policy = new BackingPolicy(options.backing);
  }

  async inspect(spec: string): Promise<Inspection> {
    const images: InspectedImage[] = [];
    const root: { location?: string } = {};
    await this.inspectLevel(spec, undefined, 0, root, [], images, undefined);
    const wouldOpen = images.every((image) => !image.error && image.references.every((r) => (r.resolved !== undefined && !r.missing) || alternativeResolved(image, r)));
    return { images, wouldOpen };
  }

  private async inspectLevel(
    spec: string,
    forcedFormat: string | undefined,
    level: number,
    root: { location?: string },
    seen: string[],
    out: InspectedImage[],
    namedBy: Provider | undefined,
  ): Promise<void> {
    const image: InspectedImage = { level, spec: redactSpec(spec), format: forcedFormat ?? 'raw', probed: false, references: [] };
    out.push(image);
    // Filters own no data: what they sit on is what gets inspected.
    let parsed = parseSpec(spec);
    while (parsed.type === 'named' && registry().get(parsed.name)?.declaration.kind === 'filter') parsed = parseSpec(parsed.arg);
    let bytesSpec = parsed.type === 'named' ? `${parsed.name}${optionText(parsed.options)}:${parsed.arg}` : spec;
    let format = forcedFormat ? registry().get(forcedFormat) : undefined;
    if (parsed.type === 'named') {
      const entry = registry().get(parsed.name);
      if (entry?.declaration.kind === 'format') {
        format = entry;
        bytesSpec = parsed.arg;
        image.format = parsed.name;
      }
    }
    let bytes: Provider;
    try {
      bytes = await this.opener.openBytes(bytesSpec, namedBy);
    } catch (e) {
      image.error = message(e);
      return;
    }
    try {
      if (bytes.location) image.location = bytes.location;
      if (level === 0) root.location = bytes.location;
      // Probed like the opener does: bare paths and URLs only, never a named source (`raw:...`).
      if (!format && !forcedFormat && parsed.type !== 'named') {
        format = await probe(bytes);
        image.probed = true;
        image.format = format?.declaration.name ?? 'raw';
      }
      if (format?.declaration.kind === 'source') format = undefined; // `raw`: the bytes themselves
      image.fileSize = bytes.info().size;
      const limits = this.opener.limits;
      if (this.options.check && format?.declaration.check) {
        try {
          image.problems = await format.declaration.check(bytes, limits);
        } catch (e) {
          image.problems = [{ field: 'image', message: message(e) }];
        }
      }
      if (!format?.declaration.references) return;
      let references: ImageReference[];
      try {
        references = await format.declaration.references(bytes, limits);
      } catch (e) {
        image.error = message(e);
        return;
      }
      const identity = bytes.location ? chainIdentity(bytes.location) : undefined;
      const chainSeen = identity ? [...seen, identity] : seen;
      let followed = false;
      for (const reference of references) {
        const judged: InspectedReference = { ...reference };
        image.references.push(judged);
        // Parent candidates are alternatives: the first that resolves to an existing file wins.
        if (reference.role === 'parent' && followed) continue;
        const target = this.judge(judged, bytes.location, root.location, level, spec, chainSeen);
        if (target === undefined || judged.missing) continue;
        if (reference.role === 'parent') judged.chosen = true;
        if (reference.role === 'data-file') continue; // raw bytes: nothing below them
        followed = true;
        const explicit = !!this.options.backing?.explicit?.length;
        await this.inspectLevel(target, explicit ? undefined : reference.format, level + 1, root, chainSeen, out, bytes);
      }
    } finally {
      await bytes.close().catch(() => {});
    }
  }

  /** What the opener would decide for one name: depth, policy, loops, existence. Returns the target to follow. */
  private judge(reference: InspectedReference, location: string | undefined, rootLocation: string | undefined, level: number, spec: string, seen: string[]): string | undefined {
    const depth = this.opener.limits.get('chain-depth');
    if (level + 1 > depth) {
      reference.refused = `backing chain deeper than ${depth} (limit chain-depth; raise it with --max-chain-depth N)`;
      return undefined;
    }
    try {
      const decision = this.policy.decide(reference.name, location, rootLocation, level, spec);
      if (seen.includes(chainIdentity(decision.target))) {
        reference.refused = 'backing chain loops: the name reaches an image already in this chain';
        return undefined;
      }
      reference.resolved = isUrl(decision.target) ? redactUrl(decision.target) : decision.target;
      if (!decision.explicit && !isUrl(decision.target) && !fs.existsSync(decision.target)) reference.missing = true;
      return decision.target;
    } catch (e) {
      reference.refused = message(e);
      return undefined;
    }
  }
}

async function probe(bytes: Provider): Promise<RegisteredProvider | undefined> {
  const size = bytes.info().size;
  const head = new Uint8Array(Math.min(PROBE_BYTES, size));
  const tail = new Uint8Array(Math.min(PROBE_BYTES, size));
  if (head.length) await bytes.read(head, 0);
  if (tail.length) await bytes.read(tail, size - tail.length);
  return registry().formats().find((f) => f.declaration.probe!({ head, tail, size }));
}

/** A parent candidate that did not resolve is fine when another candidate of the image did. */
function alternativeResolved(image: InspectedImage, reference: InspectedReference): boolean {
  return reference.role === 'parent' && image.references.some((r) => r.role === 'parent' && r.chosen);
}

function optionText(options: Record<string, string>): string {
  return Object.entries(options).map(([k, v]) => `,${k}=${v}`).join('');
}

function message(e: unknown): string {
  if (isBlockError(e)) return `${e.message} [${e.code}]`;
  return e instanceof Error ? e.message : String(e);
}
