/**
 * The provider registry. A provider class declares itself with `@provider({...})`; the
 * registry is a tsyringe container in which each open gets a child container holding
 * that open's `OpenRequest`, so a provider receives its argument, options, lower
 * provider and the means to open backing files by constructor injection.
 *
 * The registry lives on `globalThis` under a well-known symbol: a plugin that was
 * compiled against another copy of tapkit still registers into the one the CLI uses.
 */
import 'reflect-metadata';
import { container as rootContainer, injectable, type DependencyContainer } from 'tsyringe';
import type { Provider } from './provider';
import { OpenRequest } from './open-request';

export type ProviderKind = 'source' | 'format' | 'filter';

/** What a format's probe sees: the image's first and last bytes (up to 64 KiB each) and its size. */
export interface ProbeInput {
  head: Uint8Array;
  tail: Uint8Array;
  size: number;
}

export interface ProviderDeclaration {
  /** The name used in spec strings (`memory:1G`, `vhd:/x.vhd`, `--filter cache`). */
  name: string;
  kind: ProviderKind;
  /** One line for `tapkit providers`. */
  description: string;
  /** Formats only: recognises the format from an image's first/last bytes. */
  probe?: (input: ProbeInput) => boolean;
  /** Sources only: URL schemes that select this provider (`http`, `https`). */
  schemes?: string[];
  /** The option names the provider accepts (`memory,limit=1G:4G`); others are refused. */
  options?: string[];
  /** Probe order among formats: higher first (a format that only looks at the tail goes last). */
  probePriority?: number;
}

export type ProviderClass = new (...args: any[]) => Provider;

export interface RegisteredProvider {
  declaration: ProviderDeclaration;
  cls: ProviderClass;
  /** Builds an instance for one open, through the container of the tapkit copy that declared it. */
  construct(request: OpenRequest): Provider;
}

export class Registry {
  private readonly byName = new Map<string, RegisteredProvider>();

  add(entry: RegisteredProvider): void {
    const { name, kind } = entry.declaration;
    if (!/^[A-Za-z][A-Za-z0-9_-]*$/.test(name)) throw new Error(`provider name '${name}' must be a letter followed by letters, digits, '-' or '_'`);
    const existing = this.byName.get(name);
    if (existing && existing.cls !== entry.cls) throw new Error(`a provider named '${name}' is already registered (${existing.declaration.kind})`);
    if (kind === 'format' && !entry.declaration.probe) {
      // A format without a probe is legal: it is only ever used by name.
    }
    this.byName.set(name, entry);
  }

  get(name: string): RegisteredProvider | undefined {
    return this.byName.get(name);
  }

  byScheme(scheme: string): RegisteredProvider | undefined {
    const lower = scheme.toLowerCase();
    for (const entry of this.byName.values()) if (entry.declaration.schemes?.includes(lower)) return entry;
    return undefined;
  }

  list(): RegisteredProvider[] {
    const order: Record<ProviderKind, number> = { source: 0, format: 1, filter: 2 };
    return [...this.byName.values()].sort(
      (a, b) => order[a.declaration.kind] - order[b.declaration.kind] || a.declaration.name.localeCompare(b.declaration.name),
    );
  }

  formats(): RegisteredProvider[] {
    return this.list()
      .filter((e) => e.declaration.kind === 'format' && e.declaration.probe)
      .sort((a, b) => (b.declaration.probePriority ?? 0) - (a.declaration.probePriority ?? 0));
  }
}

const REGISTRY_KEY = Symbol.for('tapkit.registry.v1');

/** The process-wide registry. */
export function registry(): Registry {
  const holder = globalThis as unknown as Record<symbol, Registry | undefined>;
  return (holder[REGISTRY_KEY] ??= new Registry());
}

function constructWith(container: DependencyContainer, cls: ProviderClass, request: OpenRequest): Provider {
  const child = container.createChildContainer();
  child.register(OpenRequest, { useValue: request });
  return child.resolve(cls);
}

/**
 * Declares a provider class. The class becomes injectable; its constructor may ask for
 * the `OpenRequest` (and anything else registered in the container).
 */
export function provider(declaration: ProviderDeclaration) {
  return <T extends ProviderClass>(cls: T): T => {
    // A class compiled without decorator metadata (a plain JavaScript plugin) whose
    // constructor takes one argument is given the OpenRequest, as a TypeScript one is.
    if (!Reflect.getMetadata('design:paramtypes', cls) && cls.length === 1) Reflect.defineMetadata('design:paramtypes', [OpenRequest], cls);
    injectable()(cls);
    registry().add({ declaration, cls, construct: (request) => constructWith(rootContainer, cls, request) });
    return cls;
  };
}

/** The root container, for registering shared services a provider may inject. */
export { rootContainer as container };
