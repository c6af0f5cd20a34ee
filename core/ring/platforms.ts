/**
 * Platform kinds by name, for `--platform KIND:ARGUMENT` and the daemon's `xen` export:
 * `sim:DIR` and `xen` (a real Linux dom0 through libxenstore, libxenevtchn and
 * libxengnttab; its native libraries load only when it starts) are built in.
 *
 * `acquirePlatform` shares one running platform per spec inside a process (several
 * daemon devices on one sim directory use one XenStore daemon) and closes it when the
 * last user releases it.
 */
import * as path from 'node:path';
import type { Platform, XenStore } from './platform';
import { SimPlatform } from './sim/platform';
import { XenPlatform, XenStoreOverLibxenstore } from './xen/platform';
import { XsHandle } from '../../native/xenstore';
import { XsClient } from './sim/xs-client';

/** A XenStore connection of the toolstack's (`tapkit xen attach/detach`). */
export type StoreConnection = XenStore & { close(): void };

/** How request data reaches guest memory (grant-copy.ts): copy where possible, copy, or map. */
export type GrantAccess = 'auto' | 'copy' | 'map';
export const GRANT_ACCESS: readonly GrantAccess[] = ['auto', 'copy', 'map'];

export interface PlatformOptions {
  /** Default `auto`: grant copy on a Linux dom0, mapping elsewhere and on the sim. */
  grants?: GrantAccess;
  log?(message: string): void;
}

export interface PlatformKind {
  /** Runs the backend's side of the platform (`xen serve`, the daemon's `xen` export). */
  start(argument: string, options?: PlatformOptions): Promise<Platform>;
  /** Connects to the XenStore that a running platform serves, as the toolstack does. */
  connectStore(argument: string): Promise<StoreConnection>;
}

type PlatformFactory = PlatformKind;

const kinds = new Map<string, PlatformKind>();

export function registerPlatformKind(kind: string, implementation: PlatformKind): void {
  kinds.set(kind, implementation);
}

export function platformKinds(): string[] {
  return [...kinds.keys()].sort();
}

export class PlatformSpecError extends Error {}

/** Splits `kind:argument` and checks the kind is known. */
export function parsePlatform(spec: string): { kind: string; argument: string; factory: PlatformFactory } {
  const colon = spec.indexOf(':');
  const kind = colon < 0 ? spec : spec.slice(0, colon);
  const argument = colon < 0 ? '' : spec.slice(colon + 1);
  const factory = kinds.get(kind);
  if (!factory) throw new PlatformSpecError(`unknown platform '${spec}' (known kinds: ${platformKinds().join(', ')}; sim takes a directory: sim:DIR)`);
  return { kind, argument, factory };
}

/** Starts a platform of its own for the caller (`tapkit xen serve`). */
export function startPlatform(spec: string, options: PlatformOptions = {}): Promise<Platform> {
  const { argument, factory } = parsePlatform(spec);
  return factory.start(argument, options);
}

/** The toolstack's XenStore connection for a platform spec. */
export function connectStore(spec: string): Promise<StoreConnection> {
  const { argument, factory } = parsePlatform(spec);
  return factory.connectStore(argument);
}

const shared = new Map<string, { platform: Promise<Platform>; users: number }>();

/** A platform shared by everything in this process that names the same spec. */
export async function acquirePlatform(spec: string, options: PlatformOptions = {}): Promise<{ platform: Platform; release(): Promise<void> }> {
  // Exports that ask for different grant access get platforms of their own.
  const key = `${spec}\0${options.grants ?? 'auto'}`;
  let entry = shared.get(key);
  if (!entry) {
    const created = { platform: startPlatform(spec, options), users: 0 };
    shared.set(key, created);
    created.platform.catch(() => shared.get(key) === created && shared.delete(key));
    entry = created;
  }
  entry.users++;
  const platform = await entry.platform.catch((e) => {
    entry!.users--;
    throw e;
  });
  let released = false;
  return {
    platform,
    release: async () => {
      if (released) return;
      released = true;
      if (--entry!.users === 0 && shared.get(key) === entry) {
        shared.delete(key);
        await platform.close();
      }
    },
  };
}

function simDir(dir: string): string {
  if (!dir) throw new PlatformSpecError('the sim platform needs a directory: sim:DIR');
  return dir;
}

registerPlatformKind('sim', {
  start: async (dir, options) => {
    const platform = await SimPlatform.start(simDir(dir));
    if (options?.grants === 'copy') platform.grantAccess = 'copy';
    return platform;
  },
  connectStore: async (dir) => {
    const socket = path.join(simDir(dir), 'xenstored.sock');
    return XsClient.connect(socket).catch((e: Error) => {
      throw new Error(`cannot reach the sim XenStore at ${socket} (is 'tapkit xen serve' or a daemon with a xen export running?): ${e.message}`);
    });
  },
});

registerPlatformKind('xen', {
  start: async (argument, options) => {
    if (argument) throw new PlatformSpecError(`the xen platform takes no argument (got 'xen:${argument}')`);
    // Xen's libraries load when the platform is made (native/ opens them lazily).
    return new XenPlatform({ grants: options?.grants, log: options?.log });
  },
  // On a real dom0, xl writes vbd and qdisk nodes; `tapkit xen attach` is for what xl
  // cannot make (vbd3) and for tests. libxenstore reaches xenstored (or XENSTORED_PATH).
  connectStore: async () => {
    const xs = new XsHandle();
    const store = new XenStoreOverLibxenstore(xs);
    return Object.assign(store, { close: () => void xs.close() });
  },
});
