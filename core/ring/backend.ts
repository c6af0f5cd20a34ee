/**
 * The blkif backend of a platform: watches `/local/domain/0/backend/TYPE` (`vbd` unless
 * told otherwise, see backend-types.ts) and runs a BlkifDevice for every device that
 * appears there, until it ends. A device directory that ended stays ignored until it is
 * removed (a detach), so it is not started twice.
 */
import type { Vbd } from '../vbd';
import { backendRoot, specFromParams, type BackendType } from './backend-types';
import { BlkifDevice, type DeviceLimits } from './device';
import type { Platform, Watch } from './platform';

export const BACKEND_ROOT = backendRoot('vbd');

export interface BackendOptions {
  platform: Platform;
  openVbd(spec: string, readOnly: boolean): Promise<Vbd>;
  /** Which backend directory to serve (default `vbd`). */
  type?: BackendType;
  /** Serve only this guest's devices (a device model serves one domain). */
  domid?: number;
  limits?: DeviceLimits;
  /** How long a device waits for its frontend to close after `online=0` (DeviceOptions). */
  unplugTimeoutMs?: number;
  log?(message: string): void;
}

export class BlkifBackend {
  private readonly devices = new Map<string, BlkifDevice | 'ended' | 'starting'>();
  private watch?: Watch;
  private scanning: Promise<void> = Promise.resolve();

  private readonly root: string;

  constructor(private readonly options: BackendOptions) {
    this.root = backendRoot(options.type ?? 'vbd');
  }

  async start(): Promise<void> {
    const { store } = this.options.platform;
    this.watch = await store.watch(this.root, (path) => {
      this.scanning = this.scanning.then(() => this.scan(path)).catch((e) => this.options.log?.(`backend: ${(e as Error).message}`));
    });
  }

  /** Looks at the device a change concerns (or at all of them). */
  private async scan(changed: string): Promise<void> {
    const { store } = this.options.platform;
    const root = this.root;
    const rest = changed.startsWith(`${root}/`) ? changed.slice(root.length + 1).split('/') : [];
    let candidates: Array<[string, string]> = [];
    if (rest.length >= 2) candidates = [[rest[0], rest[1]]];
    else {
      const domains = rest.length === 1 ? [rest[0]] : await store.directory(root);
      for (const d of domains) for (const v of await store.directory(`${root}/${d}`)) candidates.push([d, v]);
    }
    const only = this.options.domid;
    if (only !== undefined) candidates = candidates.filter(([d]) => d === String(only));
    for (const [d, v] of candidates) await this.consider(d, v);
  }

  private async consider(domain: string, devid: string): Promise<void> {
    const { store } = this.options.platform;
    const key = `${domain}/${devid}`;
    const path = `${this.root}/${key}`;
    const present = (await store.read(`${path}/frontend`)) !== undefined;
    const current = this.devices.get(key);
    if (!present) {
      if (current === 'ended') this.devices.delete(key);
      return;
    }
    if (current !== undefined) return;
    if (!/^\d+$/.test(domain) || !/^\d+$/.test(devid)) return;
    if ((await store.read(`${path}/params`)) === undefined || (await store.read(`${path}/state`)) === undefined) return;
    this.devices.set(key, 'starting');
    const device = new BlkifDevice({
      platform: this.options.platform,
      backendPath: path,
      domid: Number(domain),
      devid: Number(devid),
      openVbd: (params, readOnly) => this.options.openVbd(specFromParams(this.options.type ?? 'vbd', params), readOnly),
      limits: this.options.limits,
      unplugTimeoutMs: this.options.unplugTimeoutMs,
      log: this.options.log,
      onEnd: () => this.devices.set(key, 'ended'),
    });
    try {
      await device.start();
    } catch (e) {
      this.options.log?.(`vbd ${key}: cannot start: ${(e as Error).message}`);
      this.devices.set(key, 'ended');
      return;
    }
    if (this.devices.get(key) === 'starting') this.devices.set(key, device);
  }

  /** The live devices, by "domid/devid". */
  get active(): Map<string, BlkifDevice> {
    const out = new Map<string, BlkifDevice>();
    for (const [k, d] of this.devices) if (d instanceof BlkifDevice) out.set(k, d);
    return out;
  }

  async close(): Promise<void> {
    await this.watch?.cancel();
    await this.scanning;
    for (const d of this.devices.values()) if (d instanceof BlkifDevice) await d.shutdown();
    this.devices.clear();
  }
}
