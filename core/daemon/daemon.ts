/**
 * `tapkit daemon`: many devices in one long-running process, managed over the control
 * socket (`tapkit ctl`), configured from a file that SIGHUP reloads, stopped cleanly by
 * SIGTERM (every device flushed and closed before exit).
 */
import type * as http from 'node:http';
import { ControlServer, field, type ControlHandler } from './control';
import { readConfig, sameDevice, type DaemonConfig } from './config';
import { DeviceTable } from './devices';
import { Logger } from './log';
import { startMetrics } from './metrics';
import type { ControlRequest } from './protocol';

export const DEFAULT_CONTROL = '/run/tapkit/control.sock';

export interface DaemonOptions {
  configFile?: string;
  control?: string;
  metrics?: string;
  log?: Logger;
}

/** Extra control operations contributed by other modules (e.g. `snapshot` from the VHD tools). */
const extraOps = new Map<string, (daemon: Daemon, request: ControlRequest) => Promise<unknown>>();

export function registerControlOp(op: string, handler: (daemon: Daemon, request: ControlRequest) => Promise<unknown>): void {
  extraOps.set(op, handler);
}

export class Daemon {
  readonly devices: DeviceTable;
  readonly log: Logger;
  private control?: ControlServer;
  private metricsServer?: http.Server;
  private config: DaemonConfig;
  /** Names of the devices the config file created (a reload may remove only those). */
  private readonly fromConfig = new Set<string>();
  private stopping?: Promise<void>;

  constructor(private readonly options: DaemonOptions) {
    this.config = options.configFile ? readConfig(options.configFile) : { devices: [] };
    this.log = options.log ?? new Logger(process.stderr, this.config.log?.level ?? 'info');
    this.devices = new DeviceTable(this.log, {
      maxChainDepth: this.config.limits?.maxChainDepth,
      limits: this.config.limits?.values,
      backing: { allow: this.config.limits?.allowBacking ?? [] },
    });
  }

  get controlPath(): string {
    return this.options.control ?? this.config.control ?? DEFAULT_CONTROL;
  }

  async start(): Promise<void> {
    this.control = new ControlServer(this.controlPath, this.handlers(), this.log);
    await this.control.listen();
    const metrics = this.options.metrics ?? this.config.metrics;
    if (metrics) this.metricsServer = await startMetrics(metrics, this.devices);
    await this.applyConfig(this.config);
    this.log.info('daemon started', { control: this.controlPath, pid: process.pid, ...(metrics ? { metrics } : {}) });
  }

  /** SIGHUP: reread the file; add, replace and remove config devices; leave the others alone. */
  async reload(): Promise<void> {
    if (!this.options.configFile) {
      this.log.warn('reload asked but the daemon has no config file');
      return;
    }
    let next: DaemonConfig;
    try {
      next = readConfig(this.options.configFile);
    } catch (e) {
      this.log.error('reload refused: the config is invalid; nothing changed', { error: (e as Error).message });
      return;
    }
    this.config = next;
    await this.applyConfig(next);
    this.log.info('config reloaded', { devices: next.devices.map((d) => d.name) });
  }

  private async applyConfig(config: DaemonConfig): Promise<void> {
    const wanted = new Map(config.devices.map((d) => [d.name, d]));
    for (const name of [...this.fromConfig]) {
      const existing = this.devices.byName(name);
      const entry = wanted.get(name);
      if (existing && entry && sameDevice(existing.request, entry)) continue;
      if (existing) await this.devices.destroy(existing.id).catch((e) => this.log.error('destroy failed', { device: name, error: String(e) }));
      this.fromConfig.delete(name);
    }
    for (const entry of config.devices) {
      if (this.devices.byName(entry.name)) continue;
      try {
        await this.devices.create(entry);
        this.fromConfig.add(entry.name);
      } catch (e) {
        // One bad device never stops the others from starting.
        this.log.error('device failed to start', { device: entry.name, spec: entry.spec, error: (e as Error).message });
      }
    }
  }

  private handlers(): Map<string, ControlHandler> {
    const d = this.devices;
    const handlers = new Map<string, ControlHandler>([
      ['ping', async () => ({ pid: process.pid })],
      [
        'create',
        async (r) => {
          const device = await d.create({
            spec: field(r, 'spec', 'string'),
            exports: field(r, 'exports', 'strings?'),
            filters: field(r, 'filters', 'strings?'),
            readOnly: field(r, 'readOnly', 'boolean?'),
            name: field(r, 'name', 'string?'),
          });
          return device.summary();
        },
      ],
      ['list', async () => d.list().map((device) => device.summary())],
      ['pause', async (r) => d.pause(field(r, 'device', 'string')).then(() => d.get(field(r, 'device', 'string')).summary())],
      ['unpause', async (r) => d.unpause(field(r, 'device', 'string'), field(r, 'spec', 'string?')).then(() => d.get(field(r, 'device', 'string')).summary())],
      ['destroy', async (r) => d.destroy(field(r, 'device', 'string')).then(() => ({ destroyed: field(r, 'device', 'string') }))],
      ['stats', async (r) => d.stats(field(r, 'device', 'string'))],
      ['reload', async () => this.reload().then(() => d.list().map((device) => device.summary()))],
    ]);
    for (const [op, handler] of extraOps) handlers.set(op, (r) => handler(this, r));
    return handlers;
  }

  /** Flushes and closes every device, then the control socket. Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      this.log.info('daemon stopping');
      await this.devices.destroyAll();
      await this.control?.close();
      await new Promise<void>((resolve) => (this.metricsServer ? this.metricsServer.close(() => resolve()) : resolve()));
      this.log.info('daemon stopped');
    })();
    return this.stopping;
  }
}

/** Runs a daemon until SIGTERM/SIGINT; SIGHUP reloads. */
export async function runDaemon(options: DaemonOptions): Promise<void> {
  const daemon = new Daemon(options);
  await daemon.start();
  process.on('SIGHUP', () => void daemon.reload());
  await new Promise<void>((resolve) => {
    const stop = (signal: string) => {
      daemon.log.info('signal received', { signal });
      daemon.stop().then(resolve, (e) => {
        daemon.log.error('stop failed', { error: String(e) });
        resolve();
      });
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
}

