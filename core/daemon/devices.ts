/**
 * The daemon's device table: each device is a VBD over an opened chain plus its
 * exports. Operations mirror tap-ctl: create, list, pause, unpause (optionally onto a
 * new chain), destroy, stats.
 */
import { BlockError, isBlockError } from '../errors';
import { Opener, type OpenOptions } from '../open';
import type { Provider } from '../provider';
import { Vbd } from '../vbd';
import type { VbdStatsSnapshot } from '../stats';
import { layersOf, type Layer } from '../cli/layers';
import { startExport, type ExportHandle } from './exports';
import type { Logger } from './log';

export interface DeviceRequest {
  spec: string;
  exports?: string[];
  readOnly?: boolean;
  filters?: string[];
  /** A name of the operator's choosing (config files use it to match devices on reload). */
  name?: string;
}

export interface DeviceSummary {
  id: string;
  name?: string;
  spec: string;
  state: 'running' | 'paused';
  size: number;
  readOnly: boolean;
  chain: Layer[];
  exports: Array<{ kind: string; target: string; device?: string }>;
  counters: { operations: number; bytes: number; errors: number };
}

export interface DeviceStats extends VbdStatsSnapshot {
  id: string;
  exports: Array<{ kind: string; target: string; stats?: Record<string, unknown> }>;
}

export class Device {
  exports: ExportHandle[] = [];
  constructor(
    readonly id: string,
    public request: DeviceRequest,
    readonly vbd: Vbd,
  ) {}

  summary(): DeviceSummary {
    const stats = this.vbd.stats();
    const ops = Object.values(stats.operations);
    return {
      id: this.id,
      ...(this.request.name ? { name: this.request.name } : {}),
      spec: this.request.spec,
      state: this.vbd.isPaused ? 'paused' : 'running',
      size: this.vbd.info().size,
      readOnly: this.vbd.info().readOnly,
      chain: layersOf(this.vbd.top),
      exports: this.exports.map((e) => ({ kind: e.kind, target: e.target, ...(e.device ? { device: e.device } : {}) })),
      counters: {
        operations: ops.reduce((n, o) => n + o.count, 0),
        bytes: ops.reduce((n, o) => n + o.bytes, 0),
        errors: ops.reduce((n, o) => n + o.errors, 0),
      },
    };
  }
}

export class DeviceTable {
  private readonly devices = new Map<string, Device>();
  private nextId = 0;

  constructor(
    private readonly log: Logger,
    private readonly openOptions: OpenOptions = {},
  ) {}

  private open(request: DeviceRequest, allowBacking: string[] = []): Promise<Provider> {
    const backing = { ...this.openOptions.backing, allow: [...(this.openOptions.backing?.allow ?? []), ...allowBacking] };
    return new Opener({
      ...this.openOptions,
      backing,
      readOnly: !!request.readOnly,
      filters: request.filters ?? [],
      warn: (message) => this.log.warn(message, { spec: request.spec }),
    }).open(request.spec);
  }

  async create(request: DeviceRequest): Promise<Device> {
    if (request.name && this.byName(request.name)) throw new BlockError('EEXIST', `a device named '${request.name}' exists already`);
    const id = String(this.nextId++);
    const vbd = new Vbd(await this.open(request), { readOnly: request.readOnly, name: request.name ?? `tapkit${id}` });
    const device = new Device(id, request, vbd);
    try {
      for (const text of request.exports ?? []) {
        device.exports.push(await startExport(vbd, text, { deviceId: id, log: this.log.child({ device: id }) }));
      }
    } catch (e) {
      // Nothing half-made stays behind: stop the exports already started, close the chain.
      await Promise.allSettled(device.exports.map((x) => x.close()));
      await vbd.close().catch(() => {});
      throw e;
    }
    this.devices.set(id, device);
    this.log.info('device created', { device: id, spec: request.spec, exports: device.exports.map((e) => e.target) });
    return device;
  }

  get(id: string): Device {
    const device = this.devices.get(id) ?? this.byName(id);
    if (!device) throw new BlockError('ENOENT', `no device '${id}'`);
    return device;
  }

  byName(name: string): Device | undefined {
    for (const d of this.devices.values()) if (d.request.name === name) return d;
    return undefined;
  }

  list(): Device[] {
    return [...this.devices.values()];
  }

  async pause(id: string): Promise<void> {
    const device = this.get(id);
    await device.vbd.pause();
    this.log.info('device paused', { device: device.id });
  }

  /**
   * Resumes a paused device, first reopening it on `spec` when given (a live snapshot's
   * child); `allowBacking` adds trees its chain may reach (the parent's, for a snapshot).
   */
  async unpause(id: string, spec?: string, allowBacking: string[] = []): Promise<void> {
    const device = this.get(id);
    if (!device.vbd.isPaused) throw new BlockError('EINVAL', `device ${device.id} is not paused`);
    if (spec !== undefined) {
      const next = await this.open({ ...device.request, spec }, allowBacking);
      const info = next.info();
      if (info.size !== device.vbd.info().size) {
        await next.close();
        throw new BlockError('EINVAL', `'${spec}' is ${info.size} bytes, the device is ${device.vbd.info().size}: refusing to change size under its exports`);
      }
      const old = device.vbd.replaceProvider(next);
      await old.close().catch((e) => this.log.warn('closing the old chain failed', { device: device.id, error: String(e) }));
      device.request = { ...device.request, spec };
    }
    device.vbd.resume();
    this.log.info('device resumed', { device: device.id, spec: device.request.spec });
  }

  /**
   * Stops the exports, flushes and closes the chain, forgets the device. The device is
   * gone even when an export fails to close (its chain is closed; nothing is left to
   * retry on), but the caller is told: it rejects with the first export's failure.
   */
  async destroy(id: string): Promise<void> {
    const device = this.get(id);
    this.devices.delete(device.id);
    const results = await Promise.allSettled(device.exports.map((e) => e.close()));
    if (device.vbd.isPaused) device.vbd.resume();
    await device.vbd.close();
    const failed = device.exports.flatMap((e, i) => {
      const r = results[i];
      return r.status === 'rejected' ? [{ handle: e, reason: r.reason as unknown }] : [];
    });
    for (const f of failed) this.log.warn('an export failed to close', { device: device.id, export: f.handle.kind, error: String(f.reason) });
    this.log.info('device destroyed', { device: device.id });
    if (failed.length > 0) {
      const { handle, reason } = failed[0];
      const more = failed.length > 1 ? ` (and ${failed.length - 1} more export(s))` : '';
      const code = isBlockError(reason) ? reason.code : 'EIO';
      throw new BlockError(code, `device ${device.id} was destroyed, but its ${handle.kind} export ${handle.target} failed to close${more}: ${reason instanceof Error ? reason.message : String(reason)}`);
    }
  }

  stats(id: string): DeviceStats {
    const device = this.get(id);
    return {
      id: device.id,
      ...device.vbd.stats(),
      exports: device.exports.map((e) => ({ kind: e.kind, target: e.target, ...(e.stats ? { stats: e.stats() } : {}) })),
    };
  }

  async destroyAll(): Promise<void> {
    for (const device of this.list()) {
      await this.destroy(device.id).catch((e) => this.log.error('destroy failed', { device: device.id, error: String(e) }));
    }
  }
}
