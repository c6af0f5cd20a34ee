/**
 * One vbd's backend: the xenbus state machine (io/xenbus.h) between the toolstack's
 * nodes, the frontend and the queues.
 *
 *  - start: open the VBD named by `params`, publish everything the backend knows
 *    (sizes, info, features) and switch to InitWait, in one transaction;
 *  - frontend Initialised/Connected: read its transport keys, map the ring(s), bind the
 *    channel(s), switch to Connected;
 *  - frontend Closing: drain, unmap, Closing; frontend Closed: Closed; frontend
 *    Initialising again after Closed (a guest reboot): back to InitWait;
 *  - `online=0`: ask a connected frontend to close (Closing); with the frontend Closed the
 *    device ends;
 *  - a hostile frontend (overrun, bad keys, unmappable memory) gets a reason in
 *    `<backend>/error` and Closing; nothing is served until it goes through Closed.
 *
 * State changes are handled one at a time, each after re-reading the nodes it needs, so
 * coalesced watch events are harmless.
 */
import type { Vbd } from '../vbd';
import { layoutFor, VDISK_READONLY } from './abi';
import { inTransaction, type Platform, type GrantMapper, type Watch, type XenStore } from './platform';
import { BlkifQueue } from './queue';
import { BackRing } from './sring';

export const XenbusState = {
  Unknown: 0,
  Initialising: 1,
  InitWait: 2,
  Initialised: 3,
  Connected: 4,
  Closing: 5,
  Closed: 6,
} as const;

export interface DeviceLimits {
  maxRingPageOrder: number;
  maxQueues: number;
  maxIndirectSegments: number;
}

export const DEFAULT_UNPLUG_TIMEOUT_MS = 20_000;

export const DEFAULT_LIMITS: DeviceLimits = { maxRingPageOrder: 4, maxQueues: 4, maxIndirectSegments: 256 };

export interface DeviceOptions {
  platform: Platform;
  backendPath: string;
  domid: number;
  devid: number;
  /**
   * Where the disk comes from: `openVbd` opens the VBD named by `params` (read-only when
   * `mode` is r) and the device closes it when it ends; or `vbd` is a VBD its owner (the
   * daemon) keeps, served whatever `params` says and never closed here.
   */
  openVbd?(spec: string, readOnly: boolean): Promise<Vbd>;
  vbd?: Vbd;
  limits?: DeviceLimits;
  /**
   * After `online=0`, how long the device waits for its frontend to reach Closed before
   * it gives up: it drains, unmaps, unbinds, writes Closed and ends (default 20 s; the
   * toolstack's detach waits 10 s, then removes the nodes, which ends the device too).
   */
  unplugTimeoutMs?: number;
  log?(message: string): void;
  /** Called once when the device has ended (online=0, or its directory was removed). */
  onEnd?(): void;
}

class ProtocolError extends Error {}

export class BlkifDevice {
  private readonly store: XenStore;
  private readonly limits: DeviceLimits;
  private vbd?: Vbd;
  private frontendPath = '';
  private watches: Watch[] = [];
  private chain: Promise<void> = Promise.resolve();
  private state: number = XenbusState.Initialising;
  private queues: BlkifQueue[] = [];
  private channels: Array<{ close(): void }> = [];
  private rings: Array<{ unmap(): void }> = [];
  private grants?: GrantMapper;
  private ended = false;
  private readOnly = false;
  private unplugTimer?: NodeJS.Timeout;
  /** Counters of the queues of earlier connections (the live ones are added on read). */
  private readonly pastStats = { connections: 0, requests: 0, kicksSent: 0, kicksReceived: 0, batches: 0 };

  constructor(private readonly options: DeviceOptions) {
    this.store = options.platform.store;
    this.limits = options.limits ?? DEFAULT_LIMITS;
  }

  private get be(): string {
    return this.options.backendPath;
  }

  /** The backend type this device answers for (vbd, qdisk, vbd3): `.../backend/<type>/<domid>/<devid>`. */
  private get backendType(): string {
    return this.options.backendPath.split('/').at(-3) ?? 'vbd';
  }

  private log(message: string): void {
    this.options.log?.(`${this.backendType} ${this.options.domid}/${this.options.devid}: ${message}`);
  }

  /** Runs state-machine steps one after another. */
  private enqueue(step: () => Promise<void>): Promise<void> {
    this.chain = this.chain.then(step).catch((e) => this.log(`error: ${(e as Error).message}`));
    return this.chain;
  }

  async start(): Promise<void> {
    const frontend = await this.store.read(`${this.be}/frontend`);
    const params = await this.store.read(`${this.be}/params`);
    const mode = (await this.store.read(`${this.be}/mode`)) ?? 'w';
    if (frontend === undefined || (params === undefined && !this.options.vbd)) throw new Error(`${this.be} lacks frontend or params`);
    this.frontendPath = frontend;
    this.readOnly = !mode.startsWith('w');
    try {
      if (this.options.vbd) this.vbd = this.options.vbd;
      else if (this.options.openVbd) this.vbd = await this.options.openVbd(params!, this.readOnly);
      else throw new Error('no VBD to serve');
      this.readOnly ||= this.vbd.info().readOnly;
    } catch (e) {
      await this.fail(`cannot open '${params}': ${(e as Error).message}`);
      this.watches.push(await this.store.watch(this.be, () => void this.enqueue(() => this.step())));
      return;
    }
    await this.publish();
    this.watches.push(await this.store.watch(`${frontend}/state`, () => void this.enqueue(() => this.step())));
    this.watches.push(await this.store.watch(this.be, () => void this.enqueue(() => this.step())));
  }

  /** Everything the backend knows, then InitWait (XENSIM.md settled detail 8). */
  private async publish(): Promise<void> {
    const vbd = this.vbd!;
    const info = vbd.info();
    const caps = vbd.capabilities();
    const sectorSize = Math.max(512, info.logicalBlockSize);
    const physical = Math.max(sectorSize, info.physicalBlockSize);
    const nodes: Record<string, string | number> = {
      sectors: Math.floor(info.size / 512),
      'sector-size': sectorSize,
      'physical-sector-size': physical,
      info: this.readOnly ? VDISK_READONLY : 0,
      'feature-flush-cache': 1,
      'feature-barrier': caps.write && !this.readOnly ? 1 : 0,
      'feature-discard': this.discard ? 1 : 0,
      'feature-persistent': 1,
      'feature-max-indirect-segments': this.limits.maxIndirectSegments,
      'max-ring-page-order': this.limits.maxRingPageOrder,
      'multi-queue-max-queues': this.limits.maxQueues,
    };
    if (this.discard) {
      nodes['discard-granularity'] = physical;
      nodes['discard-alignment'] = 0;
      nodes['discard-secure'] = 0;
    }
    await inTransaction(this.store, async (tx) => {
      for (const [key, value] of Object.entries(nodes)) await this.store.write(`${this.be}/${key}`, String(value), tx);
      await this.store.rm(`${this.be}/error`, tx);
      await this.store.write(`${this.be}/state`, String(XenbusState.InitWait), tx);
    });
    this.state = XenbusState.InitWait;
  }

  /** Discard is offered when the disk can trim and may be written. */
  private get discard(): boolean {
    return !!this.vbd && this.vbd.capabilities().trim && !this.readOnly;
  }

  private async setState(state: number): Promise<void> {
    await inTransaction(this.store, (tx) => this.store.write(`${this.be}/state`, String(state), tx));
    this.state = state;
  }

  /** A broken frontend: a reason in `error`, and Closing until it starts over. */
  private async fail(reason: string): Promise<void> {
    this.log(reason);
    await this.disconnect();
    await inTransaction(this.store, async (tx) => {
      await this.store.write(`${this.be}/error`, reason, tx);
      await this.store.write(`${this.be}/state`, String(XenbusState.Closing), tx);
    });
    this.state = XenbusState.Closing;
  }

  private async step(): Promise<void> {
    if (this.ended) return;
    if ((await this.store.read(`${this.be}/frontend`)) === undefined) return this.end(); // directory removed
    const online = (await this.store.read(`${this.be}/online`)) !== '0';
    const fe = Number((await this.store.read(`${this.frontendPath}/state`)) ?? XenbusState.Unknown);
    const S = XenbusState;
    const frontendDown = fe === S.Closed || fe === S.Unknown || fe === S.Initialising || !Number.isInteger(fe);

    if (!online && frontendDown) {
      await this.disconnect();
      if (this.state !== S.Closed) await this.setState(S.Closed);
      return this.end();
    }
    if (!online) {
      // Hot-unplug: ask the frontend to let go, for a bounded time.
      if (this.state !== S.Closing && this.state !== S.Closed) await this.setState(S.Closing);
      this.armUnplugTimer();
      return;
    }
    if (!this.vbd) return; // could not open: stay in Closing with the error
    switch (fe) {
      case S.Initialised:
      case S.Connected:
        if (this.state === S.InitWait) await this.connect();
        return;
      case S.Closing:
        if (this.state !== S.Closing && this.state !== S.Closed) {
          await this.disconnect();
          await this.setState(S.Closing);
        }
        return;
      case S.Initialising:
        if (this.state === S.Connected || this.state === S.Closing) {
          // Closed and Initialising coalesced: close first.
          await this.disconnect();
          await this.setState(S.Closed);
        }
        if (this.state === S.Closed) await this.publish();
        return;
      default:
        // Closed, Unknown, or a frontend that vanished.
        if (this.state !== S.Closed && this.state !== S.InitWait) {
          await this.disconnect();
          await this.setState(S.Closed);
        }
    }
  }

  private armUnplugTimer(): void {
    if (this.unplugTimer || this.ended) return;
    const ms = this.options.unplugTimeoutMs ?? DEFAULT_UNPLUG_TIMEOUT_MS;
    this.unplugTimer = setTimeout(() => void this.enqueue(() => this.giveUp(ms)), ms);
    this.unplugTimer.unref();
  }

  /** online=0 and the frontend never closed: free everything anyway. */
  private async giveUp(ms: number): Promise<void> {
    if (this.ended) return;
    this.log(`the frontend did not close within ${ms} ms of online=0: closing without it`);
    await this.disconnect();
    if (this.state !== XenbusState.Closed) await this.setState(XenbusState.Closed).catch(() => undefined);
    await this.end();
  }

  private async connect(): Promise<void> {
    const fe = this.frontendPath;
    const read = (key: string) => this.store.read(`${fe}/${key}`);
    try {
      const protocol = await read('protocol');
      const layout = layoutFor(protocol);
      if (!layout) throw new ProtocolError(`unknown protocol '${protocol}'`);
      const persistent = (await read('feature-persistent')) === '1';
      const order = await this.number(read('ring-page-order'), 'ring-page-order', 0, this.limits.maxRingPageOrder, 0);
      const queueCount = await this.number(read('multi-queue-num-queues'), 'multi-queue-num-queues', 1, this.limits.maxQueues, 1);
      const transports = [];
      for (let q = 0; q < queueCount; q++) {
        const base = queueCount > 1 ? `${fe}/queue-${q}` : fe;
        const refs: number[] = [];
        if (order === 0) {
          const ref = (await this.store.read(`${base}/ring-ref`)) ?? (await this.store.read(`${base}/ring-ref0`));
          refs.push(await this.number(Promise.resolve(ref), `${base}/ring-ref`, 0, 0xffffffff));
        } else {
          for (let i = 0; i < 1 << order; i++) refs.push(await this.number(this.store.read(`${base}/ring-ref${i}`), `${base}/ring-ref${i}`, 0, 0xffffffff));
        }
        const port = await this.number(this.store.read(`${base}/event-channel`), `${base}/event-channel`, 1, 0xffffffff);
        transports.push({ refs, port });
      }
      const { platform } = this.options;
      this.grants = platform.grantsFor(this.options.domid, { persistent });
      for (const t of transports) {
        const ringMapping = this.grants.mapRing(t.refs);
        this.rings.push(ringMapping);
        const queue = new BlkifQueue(new BackRing(ringMapping.bytes, layout.slotSize), {
          vbd: this.vbd!,
          layout,
          grants: this.grants,
          maxIndirectSegments: this.limits.maxIndirectSegments,
          discard: this.discard,
          readOnly: this.readOnly,
          checkRing: ringMapping.check ? () => ringMapping.check!() : undefined,
          onFatal: (reason) => void this.enqueue(() => this.fail(reason)),
          onRefused: (reason) => this.log(`refused a request: ${reason}`),
        });
        const channel = platform.events.bind(this.options.domid, t.port, () => queue.kick());
        queue.attach(channel);
        this.channels.push(channel);
        this.queues.push(queue);
      }
      await this.setState(XenbusState.Connected);
      this.log(`connected: ${layout.protocol}, ${queueCount} queue(s), ring order ${order}${persistent ? ', persistent grants' : ''}${this.grants.access ? `, data by ${this.grants.access}` : ''}`);
      for (const q of this.queues) q.kick();
    } catch (e) {
      await this.fail(`cannot connect: ${(e as Error).message}`);
    }
  }

  private async number(value: Promise<string | undefined>, key: string, min: number, max: number, absent?: number): Promise<number> {
    const text = await value;
    if (text === undefined) {
      if (absent !== undefined) return absent;
      throw new ProtocolError(`${key} is missing`);
    }
    const n = /^\d+$/.test(text.trim()) ? Number(text.trim()) : NaN;
    if (!Number.isInteger(n) || n < min || n > max) throw new ProtocolError(`${key} is '${text}' (expected ${min}..${max})`);
    return n;
  }

  /** Drains the queues (every request taken gets its response), then unbinds and unmaps. */
  private async disconnect(): Promise<void> {
    const queues = this.queues;
    this.queues = [];
    await Promise.all(queues.map((q) => q.stop()));
    if (queues.length > 0) this.pastStats.connections++;
    for (const q of queues) for (const k of ['requests', 'kicksSent', 'kicksReceived', 'batches'] as const) this.pastStats[k] += q.stats[k];
    for (const c of this.channels) c.close();
    this.channels = [];
    for (const r of this.rings) r.unmap();
    this.rings = [];
    this.grants?.close();
    this.grants = undefined;
  }

  private async end(): Promise<void> {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.unplugTimer);
    await this.disconnect();
    for (const w of this.watches) await w.cancel();
    this.watches = [];
    if (!this.options.vbd) await this.vbd?.close().catch(() => undefined);
    const s = this.stats();
    this.log(`ended (${s.requests} requests in ${s.batches} batches, ${s.kicksReceived} notifications received, ${s.kicksSent} sent)`);
    this.options.onEnd?.();
  }

  /** Stops serving (process shutdown): drains and releases everything. */
  async shutdown(): Promise<void> {
    await this.enqueue(() => this.end());
  }

  get xenbusState(): number {
    return this.state;
  }

  get queueStats() {
    return this.queues.map((q) => ({ ...q.stats }));
  }

  /**
   * Counters over the device's life: connections made, requests taken off the ring(s),
   * notifications sent and received, and batches (turns that found requests waiting).
   * Few kicks per request mean the notification hold-off works.
   */
  stats(): { state: number; connected: boolean; connections: number; requests: number; kicksSent: number; kicksReceived: number; batches: number } {
    const total = { ...this.pastStats };
    if (this.queues.length > 0) total.connections++;
    for (const q of this.queues) for (const k of ['requests', 'kicksSent', 'kicksReceived', 'batches'] as const) total[k] += q.stats[k];
    return { state: this.state, connected: this.state === XenbusState.Connected, ...total };
  }

  get hasEnded(): boolean {
    return this.ended;
  }
}
