/**
 * Shared by the blkif tests: a sim platform with tapkit's backend in this process, the C
 * frontend (compiled here with gcc against Xen's headers and libxenstore), and the data
 * pattern the frontends write.
 */
import * as os from 'node:os';
import * as path from 'node:path';
import '../../providers';
import { Opener } from '../../core/open';
import type { Provider } from '../../core/provider';
import { BlkifBackend } from '../../core/ring/backend';
import type { Platform, XenStore } from '../../core/ring/platform';
import { SimPlatform } from '../../core/ring/sim/platform';
import { XsClient } from '../../core/ring/sim/xs-client';
import { attach } from '../../core/ring/toolstack';
import { Vbd } from '../../core/vbd';
import { must, run, type RunResult } from '../helpers/run';
import { fileTempDir, removeDir } from '../helpers/temp';

export const REPO = path.resolve(__dirname, '../../..');
export const FRONTEND_SOURCE = path.join(REPO, 'test/xen/frontend.c');

/** The byte the frontends write at disk offset `offset` (frontend.c's pattern()). */
export function pattern(offset: number, seed: number): number {
  return (Math.floor(offset / 512) * 31 + (offset % 512) + seed) & 0xff;
}

let compiled: Promise<string> | undefined;
/** Compiles frontend.c once per test process; resolves with the binary's path. */
export function frontendBinary(): Promise<string> {
  compiled ??= (async () => {
    const out = path.join(fileTempDir('tapkit-frontend-'), 'frontend');
    await must('gcc', ['-O2', '-Wall', '-Werror', '-Wno-format-truncation', '-Wno-unused-local-typedefs', '-o', out, FRONTEND_SOURCE, '-lxenstore'], { timeoutMs: 60_000 });
    return out;
  })();
  return compiled;
}

/** Runs the C frontend against the platform in `dir` (bounded). */
export async function runFrontend(dir: string, domid: number, devid: number, args: string[], timeoutMs = 90_000): Promise<RunResult> {
  const binary = await frontendBinary();
  return run(binary, [dir, String(domid), String(devid), ...args], { env: { ...process.env, XENSTORED_PATH: path.join(dir, 'xenstored.sock') }, timeoutMs });
}

/** A sim platform with tapkit's backend running in this process. */
export class SimBackend {
  readonly providers = new Map<string, Provider>();
  readonly log: string[] = [];
  private constructor(
    readonly dir: string,
    readonly platform: SimPlatform,
    readonly backend: BlkifBackend,
  ) {}

  /**
   * `unplugTimeoutMs`: the devices' wait for a frontend to close after online=0.
   * `store`: the XenStore the backend uses instead of the platform's own (a wrapper that
   * provokes real conflicts, for instance).
   */
  static async start(options: { maxIndirectSegments?: number; unplugTimeoutMs?: number; store?: (platform: SimPlatform) => XenStore } = {}): Promise<SimBackend> {
    const dir = fileTempDir('tapkit-sim-');
    const platform = await SimPlatform.start(dir);
    const providers = new Map<string, Provider>();
    const log: string[] = [];
    const backend = new BlkifBackend({
      platform: options.store ? wrapStore(platform, options.store(platform)) : platform,
      unplugTimeoutMs: options.unplugTimeoutMs,
      limits: { maxRingPageOrder: 4, maxQueues: 4, maxIndirectSegments: options.maxIndirectSegments ?? 256 },
      log: (m) => log.push(m),
      openVbd: async (spec, readOnly) => {
        const provider = await new Opener({ readOnly }).open(spec);
        providers.set(spec, provider);
        return new Vbd(provider, { readOnly, name: spec });
      },
    });
    await backend.start();
    const sim = new SimBackend(dir, platform, backend);
    (sim as { providers: Map<string, Provider> }).providers = providers;
    (sim as { log: string[] }).log = log;
    return sim;
  }

  /** Attaches SPEC as vbd `devid` of domain `domid` (the toolstack's part, over the socket). */
  async attach(domid: number, devid: number, spec: string, readOnly = false): Promise<void> {
    const client = await XsClient.connect(path.join(this.dir, 'xenstored.sock'));
    try {
      await attach(client, { domid, devid, spec, readOnly });
    } finally {
      client.close();
    }
  }

  async waitForDevice(domid: number, devid: number): Promise<void> {
    const deadline = Date.now() + 60_000; // a loaded machine can be slow; never a fixed count of tries
    while (Date.now() < deadline) {
      if ((await this.platform.store.read(`/local/domain/0/backend/vbd/${domid}/${devid}/state`)) === '2') return;
      await new Promise((r) => setTimeout(r, 25));
    }
    throw new Error(`vbd ${domid}/${devid} did not reach InitWait`);
  }

  async close(): Promise<void> {
    await this.backend.close();
    await this.platform.close();
    removeDir(this.dir);
  }
}

/** The sim platform with another XenStore in front of its own. */
function wrapStore(platform: SimPlatform, store: XenStore): Platform {
  return {
    name: platform.name,
    store,
    events: platform.events,
    grantsFor: (domid, options) => platform.grantsFor(domid, options),
    close: () => platform.close(),
  };
}

/** Reads `length` bytes at `offset` from a provider. */
export async function readProvider(p: Provider, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  await p.read(buf, offset);
  return buf;
}

/** The offsets (within [offset, offset+length)) where `data` differs from the pattern; -1 if none. */
export function firstMismatch(data: Uint8Array, offset: number, seed: number): number {
  for (let i = 0; i < data.length; i++) if (data[i] !== pattern(offset + i, seed)) return offset + i;
  return -1;
}

export const tmpRoot = os.tmpdir();
