/**
 * What every CLI command shares: global options (--plugin, --debug), opening specs with
 * the open options, and turning errors into one line on stderr with the right exit code
 * (2 for what the user typed wrong, 1 for I/O failures).
 */
import * as path from 'node:path';
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import type { Command } from 'commander';
import { BlockError, SpecError, isBlockError } from '../errors';
import { Opener, type OpenOptions } from '../open';
import type { Provider } from '../provider';
import { LIMIT_DEFINITIONS, parseLimitFlag, type LimitValues } from '../limits';
import { isUrl } from '../resolve';

export class UsageError extends Error {}

export interface GlobalOptions {
  plugin?: string[];
  debug?: boolean;
}

export function globalOptions(command: Command): GlobalOptions {
  return command.optsWithGlobals() as GlobalOptions;
}

/** Loads each `--plugin MODULE` (a path or a package name); it registers its providers on load. */
export async function loadPlugins(modules: string[]): Promise<void> {
  for (const name of modules) {
    try {
      await import(pluginTarget(name));
    } catch (e) {
      const reason = (e instanceof Error ? e.message.split('\n')[0] : String(e)).replace(/ imported from \S+$/, '');
      throw new SpecError('EINVAL', `cannot load plugin '${name}': ${reason}`, true, { cause: e });
    }
  }
}

/**
 * A path (`./mine.js`, `/abs/mine.js`, `mine.js`) loads that file; a package name is
 * resolved from the current directory (the user's project), then from tapkit's own.
 */
function pluginTarget(name: string): string {
  const isPath = name.startsWith('.') || path.isAbsolute(name) || /\.[cm]?js$/.test(name);
  if (isPath) return pathToFileURL(path.resolve(name)).href;
  try {
    return pathToFileURL(createRequire(path.join(process.cwd(), 'package.json')).resolve(name)).href;
  } catch {
    return name;
  }
}

/** Options shared by commands that open a disk: --read-only, --filter. */
export interface OpenCliOptions {
  readOnly?: boolean;
  filter?: string[];
  maxChainDepth?: string;
  /** `--limit NAME=VALUE`, repeatable (core/limits.ts). */
  limit?: string[];
  allowBacking?: string[];
  /** commander turns --no-backing into backing: false. */
  backing?: string[] | false;
  /** For http(s) disks: a PEM file of CAs to trust besides the system's. */
  ca?: string;
  /** For http(s) disks: `Name: value` headers sent with every request. */
  header?: string[];
  /** For http(s) disks: the proxy URL, or `none` (default: http_proxy, https_proxy, no_proxy). */
  proxy?: string;
}

export function addOpenOptions(command: Command): Command {
  return command
    .option('--filter <name[,key=value...]>', 'put a filter on top (repeatable)', collect, [])
    .option('--max-chain-depth <n>', 'longest backing chain accepted (default 16; the same as --limit chain-depth=N)')
    .option('--limit <name=value>', `raise or lower a resource limit against hostile images (repeatable): ${Object.keys(LIMIT_DEFINITIONS).join(', ')}`, collect, [])
    .option('--allow-backing <dir|url-prefix>', 'let backing files come from this tree or URL prefix too (repeatable)', collect, [])
    .option('--backing <spec>', 'name the backing chain explicitly, one level per use, instead of trusting the image', collect, [])
    .option('--no-backing', 'refuse every backing file and parent')
    .option('--ca <file>', 'https disks: trust the CAs in this PEM file too')
    .option('--header <"Name: value">', 'http(s) disks: send this header with every request (repeatable)', collect, [])
    .option('--proxy <url|none>', 'http(s) disks: go through this http proxy, or none (default: the http_proxy, https_proxy, no_proxy environment)');
}

/** --ca, --header and --proxy as options of every http source opened (a spec's own options win). */
function httpOptions(options: OpenCliOptions): Record<string, string> {
  const http: Record<string, string> = {};
  if (options.ca) http.ca = path.resolve(options.ca);
  const headers = options.header ?? [];
  for (const h of headers) if (!/^[^:\s]+\s*:/.test(h)) throw new UsageError(`--header needs 'Name: value' (got a value without a name)`);
  // The http source percent-decodes its header option (a spec cannot hold ':' or ',').
  if (headers.length) http.header = encodeURIComponent(headers.join('\n'));
  if (options.proxy !== undefined) http.proxy = encodeURIComponent(options.proxy);
  return http;
}

export function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

export function openerFor(options: OpenCliOptions, extra: OpenOptions = {}): Opener {
  return new Opener(openOptionsFor(options, extra));
}

/** The open options the CLI flags ask for (also used by inspection, which opens nothing). */
export function openOptionsFor(options: OpenCliOptions, extra: OpenOptions = {}): OpenOptions {
  const limits: Partial<LimitValues> = {};
  for (const text of options.limit ?? []) {
    try {
      const [name, value] = parseLimitFlag(text);
      limits[name] = value;
    } catch (e) {
      throw new UsageError((e as Error).message);
    }
  }
  if (options.maxChainDepth !== undefined) {
    const depth = Number(options.maxChainDepth);
    if (!Number.isInteger(depth) || depth < 0) throw new UsageError(`--max-chain-depth must be a whole number (got '${options.maxChainDepth}')`);
    limits['chain-depth'] = depth;
  }
  const backing = {
    allow: (options.allowBacking ?? []).map((a) => (isUrl(a) ? a : path.resolve(a))),
    noBacking: options.backing === false,
    explicit: options.backing === false ? [] : options.backing ?? [],
  };
  const http = httpOptions(options);
  const providerOptions = Object.keys(http).length ? { http } : undefined;
  return { readOnly: !!options.readOnly, filters: options.filter ?? [], limits, backing, providerOptions, ...extra };
}

export async function withProvider<T>(spec: string, options: OpenCliOptions, fn: (p: Provider) => Promise<T>, extra: OpenOptions = {}): Promise<T> {
  const provider = await openerFor(options, extra).open(spec);
  try {
    return await fn(provider);
  } finally {
    await provider.close();
  }
}

/** Exit code for an error: 2 for usage, 1 for everything else. */
export function exitCodeFor(e: unknown): number {
  if (e instanceof UsageError) return 2;
  if (e instanceof SpecError && e.usage) return 2;
  return 1;
}

export function describeError(e: unknown): string {
  if (isBlockError(e)) return `${(e as BlockError).message} [${(e as BlockError).code}]`;
  if (e instanceof Error) return e.message;
  return String(e);
}

/** Reports an error as one line (a stack trace too with --debug) and sets the exit code. */
export function reportError(e: unknown, debug: boolean): void {
  process.stderr.write(`tapkit: ${describeError(e)}\n`);
  if (debug) {
    for (let cause: unknown = e; cause instanceof Error; cause = cause.cause) {
      if (cause !== e) process.stderr.write('caused by: ');
      process.stderr.write(`${cause.stack ?? cause.message}\n`);
    }
  }
  process.exitCode = exitCodeFor(e);
}
