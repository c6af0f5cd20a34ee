/**
 * Turns a spec string into an opened provider chain through the registry: sources by
 * name, URL scheme or path; formats over their source (probed for bare paths and URLs);
 * filters on top. Backing files named inside images come back here through
 * `OpenRequest.openBacking`, resolved against the image's location and bounded in depth,
 * with cycles refused.
 */
import { BlockError, SpecError, asBlockError, isBlockError } from './errors';
import type { Provider } from './provider';
import { OpenRequest, type BackingOptions } from './open-request';
import { registry, type Registry, type RegisteredProvider } from './registry';
import { parseFilterArg, parseSpec } from './spec';
import { BackingPolicy, type BackingPolicyOptions } from './backing-policy';
export { resolveBacking } from './resolve';
import { redactSpec } from './redact';

export interface OpenOptions {
  readOnly?: boolean;
  /** Filters put on top, innermost first (`cache`, `cache,size=64M`). */
  filters?: string[];
  /** Longest chain of backing files accepted (default 16). */
  maxChainDepth?: number;
  /** Where warnings go (default: stderr). */
  warn?: (message: string) => void;
  registry?: Registry;
  /** Where backing files may be opened from (core/backing-policy.ts). */
  backing?: BackingPolicyOptions;
  /**
   * Options for every provider of a name, from the command line (`--ca`, `--header` give
   * `{ http: { ca, header } }`); a spec's own options win over them.
   */
  providerOptions?: Record<string, Record<string, string>>;
}

interface ChainState {
  depth: number;
  /** Locations already open in this chain, to refuse cycles. */
  seen: string[];
  /** The location of the image the user named: the backing policy's anchor. Shared by the whole chain. */
  root: { location?: string };
  /** In a backing chain: the image whose backing reference is being opened. */
  namedBy?: Provider;
}

const PROBE_BYTES = 65536;
/** The file source used for bare paths and for `format:/path`. */
export const PATH_SOURCE = 'raw';

export class Opener {
  private readonly registry: Registry;
  private readonly maxChainDepth: number;
  private readonly warn: (message: string) => void;
  private readonly policy: BackingPolicy;

  constructor(private readonly options: OpenOptions = {}) {
    this.policy = new BackingPolicy(options.backing);
    this.registry = options.registry ?? registry();
    this.maxChainDepth = options.maxChainDepth ?? 16;
    this.warn = options.warn ?? ((m) => process.stderr.write(`tapkit: warning: ${m}\n`));
  }

  /** Opens a full spec with the options' filters on top. */
  async open(spec: string): Promise<Provider> {
    const chain: ChainState = { depth: 0, seen: [], root: {} };
    let top = await this.openSpec(spec, !!this.options.readOnly, chain, true);
    for (const filter of this.options.filters ?? []) {
      const { name, options } = parseFilterArg(filter);
      const entry = this.lookup(name, `--filter ${filter}`);
      if (entry.declaration.kind !== 'filter') {
        await top.close().catch(() => {});
        throw new SpecError('EINVAL', `'${name}' is a ${entry.declaration.kind}, not a filter (in --filter ${filter})`, true);
      }
      top = await this.construct(entry, `${filter}:${spec}`, '', options, top, !!this.options.readOnly, chain);
    }
    return top;
  }

  private lookup(name: string, spec: string): RegisteredProvider {
    const entry = this.registry.get(name);
    if (!entry) {
      const known = this.registry.list().map((e) => e.declaration.name).join(', ');
      throw new SpecError('EINVAL', `unknown provider '${name}' in spec '${redactSpec(spec)}' (known: ${known}; write ./${redactSpec(spec)} for a file)`, true);
    }
    return entry;
  }

  /**
   * `probe` says whether a bare path or URL gets its format detected: true at the top
   * and for backing files without a named format, false under an explicit format.
   */
  private async openSpec(spec: string, readOnly: boolean, chain: ChainState, probe: boolean): Promise<Provider> {
    const parsed = parseSpec(spec);
    switch (parsed.type) {
      case 'path': {
        const source = await this.construct(this.lookup(PATH_SOURCE, spec), spec, parsed.path, {}, undefined, readOnly, chain);
        return probe ? this.probeFormat(source, spec, readOnly, chain) : source;
      }
      case 'url': {
        const entry = this.registry.byScheme(parsed.scheme);
        if (!entry) throw new SpecError('EINVAL', `no provider handles '${parsed.scheme}://' URLs (in spec '${spec}')`, true);
        const source = await this.construct(entry, spec, parsed.url, {}, undefined, readOnly, chain);
        return probe ? this.probeFormat(source, spec, readOnly, chain) : source;
      }
      case 'named': {
        const entry = this.lookup(parsed.name, spec);
        if (entry.declaration.kind === 'source') {
          return this.construct(entry, spec, parsed.arg, parsed.options, undefined, readOnly, chain);
        }
        if (parsed.arg === '') throw new SpecError('EINVAL', `'${parsed.name}' needs a disk to sit on (in spec '${spec}')`, true);
        // A format reads its container from the inner spec as it is; a filter sits on a full chain.
        const lower = await this.openSpec(parsed.arg, readOnly, chain, entry.declaration.kind === 'filter');
        return this.construct(entry, spec, parsed.arg, parsed.options, lower, readOnly, chain);
      }
    }
  }

  private async probeFormat(source: Provider, spec: string, readOnly: boolean, chain: ChainState): Promise<Provider> {
    const formats = this.registry.formats();
    if (formats.length === 0) return source;
    try {
      const size = source.info().size;
      const head = new Uint8Array(Math.min(PROBE_BYTES, size));
      const tail = new Uint8Array(Math.min(PROBE_BYTES, size));
      if (head.length) await source.read(head, 0);
      if (tail.length) await source.read(tail, size - tail.length);
      const match = formats.find((f) => f.declaration.probe!({ head, tail, size }));
      if (!match) return source;
      return await this.construct(match, `${match.declaration.name}:${spec}`, spec, {}, source, readOnly, chain);
    } catch (e) {
      await source.close().catch(() => {});
      throw e;
    }
  }

  /** Builds one provider and runs its `open()` hook; on failure closes what it was given. */
  private async construct(
    entry: RegisteredProvider,
    spec: string,
    arg: string,
    options: Record<string, string>,
    lower: Provider | undefined,
    readOnly: boolean,
    chain: ChainState,
  ): Promise<Provider> {
    const { name } = entry.declaration;
    try {
      options = { ...this.options.providerOptions?.[name], ...options };
      const allowed = entry.declaration.options ?? [];
      for (const key of Object.keys(options)) {
        if (!allowed.includes(key)) {
          throw new SpecError('EINVAL', `provider '${name}' has no option '${key}' (in spec '${redactSpec(spec)}'${allowed.length ? `; options: ${allowed.join(', ')}` : ''})`, true);
        }
      }
      // Backing names resolve against the image's location, known once the instance exists.
      let instance: Provider | undefined;
      const locationOf = () => instance?.location ?? lower?.location;
      const request = new OpenRequest(spec, arg, Object.freeze({ ...options }), lower, readOnly, (backingName, backingOptions) => {
        const location = locationOf();
        const seen = location ? [...chain.seen, location] : chain.seen;
        return this.openBacking(backingName, backingOptions ?? {}, location, spec, { depth: chain.depth, seen, root: chain.root, namedBy: instance });
      }, this.warn, chain.namedBy);
      instance = entry.construct(request);
      // The first located source of the top chain anchors the backing policy.
      if (chain.depth === 0 && chain.root.location === undefined && instance.location) chain.root.location = instance.location;
      const hook = (instance as { open?: () => Promise<void> }).open;
      if (typeof hook === 'function') await hook.call(instance);
      return instance;
    } catch (e) {
      if (lower) await lower.close().catch(() => {});
      if (isBlockError(e)) throw e;
      throw asBlockError(e, name);
    }
  }

  private async openBacking(name: string, options: BackingOptions, location: string | undefined, childSpec: string, chain: ChainState): Promise<Provider> {
    if (chain.depth + 1 > this.maxChainDepth) {
      throw new BlockError('ELOOP', `backing chain deeper than ${this.maxChainDepth} (limit --max-chain-depth) at '${name}' named by '${childSpec}'`);
    }
    const decision = this.policy.decide(name, location, chain.root.location, chain.depth, childSpec);
    if (chain.seen.includes(decision.target)) {
      throw new BlockError('ELOOP', `backing chain loops: '${childSpec}' names '${name}', which is already open in this chain`);
    }
    const next: ChainState = { depth: chain.depth + 1, seen: chain.seen, root: chain.root, namedBy: chain.namedBy };
    // The user's own spec is opened as written; a name from an image gets its named format, or is probed.
    if (decision.explicit) return this.openSpec(decision.target, true, next, true);
    const spec = options.format ? `${options.format}:${decision.target}` : decision.target;
    return this.openSpec(spec, true, next, !options.format);
  }
}

/** Convenience: open a spec with default options. */
export function openSpec(spec: string, options: OpenOptions = {}): Promise<Provider> {
  return new Opener(options).open(spec);
}
