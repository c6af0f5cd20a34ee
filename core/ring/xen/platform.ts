/**
 * The `xen` platform: a real dom0 (Linux), through libxenstore, libxenevtchn and
 * libxengnttab bound in native/. The blkif backend runs on it exactly as on `sim`.
 *
 *  - XenStore: one libxenstore handle; watch events arrive from a worker thread.
 *  - Event channels: one /dev/xen/evtchn handle for every binding; a worker thread waits
 *    for pending ports, each is unmasked and its binding's handler runs on the event loop.
 *    A loopback channel (a port of our own bound to another of our own) wakes the waiting
 *    thread when the platform closes.
 *  - Grants: one gntdev handle; the ring pages of a connection are mapped as one region,
 *    a request's data pages are mapped for the request and unmapped when it completes.
 */
import * as fs from 'node:fs';
import { GntTab, type GrantMapping } from '../../../native/xengnttab';
import { EvtchnHandle } from '../../../native/xenevtchn';
import { XsHandle } from '../../../native/xenstore';
import { PAGE } from '../abi';
import type { GrantAccess } from '../platforms';
import { CopyingGrantMapper, CopyUnavailable, type CopyPiece } from '../grant-copy';
import { PersistentGrantMapper } from '../persistent-grants';
import { GrantError, type EventChannel, type EventChannels, type GrantMapper, type PageMapping, type Platform, type RingMapping, type TxId, type Watch, type XenStore } from '../platform';

/**
 * How many calls into the Xen libraries the platform made (each is an ffi-napi call, and
 * most a system call): logged when the platform closes, to see what a request costs.
 */
export interface XenCallCounts {
  grantCopies: number;
  grantCopySegments: number;
  grantMaps: number;
  grantUnmaps: number;
  notifies: number;
  pendings: number;
  unmasks: number;
}

/** TAPKIT_XEN_TRACE=1: every grant and event-channel call on stderr, written synchronously. */
const tracing = process.env.TAPKIT_XEN_TRACE === '1';
function trace(message: string): void {
  if (tracing) fs.writeSync(2, `xen-trace ${message}\n`);
}

export class XenStoreOverLibxenstore implements XenStore {
  constructor(readonly xs: XsHandle) {}

  async read(path: string, tx: TxId = 0): Promise<string | undefined> {
    return this.xs.read(path, tx);
  }

  async write(path: string, value: string, tx: TxId = 0): Promise<void> {
    this.xs.write(path, value, tx);
  }

  async directory(path: string, tx: TxId = 0): Promise<string[]> {
    return this.xs.directory(path, tx);
  }

  async rm(path: string, tx: TxId = 0): Promise<void> {
    this.xs.rm(path, tx);
  }

  async watch(path: string, onChange: (path: string) => void): Promise<Watch> {
    let live = true;
    const w = this.xs.watch(path, (p) => live && onChange(p));
    return {
      cancel: async () => {
        live = false;
        w.cancel();
      },
    };
  }

  async setPermissions(path: string, permissions: string[], tx: TxId = 0): Promise<void> {
    this.xs.setPermissions(path, permissions, tx);
  }

  async transactionStart(): Promise<TxId> {
    return this.xs.transactionStart();
  }

  async transactionEnd(tx: TxId, commit: boolean): Promise<boolean> {
    return this.xs.transactionEnd(tx, commit);
  }
}

class XenEventChannels implements EventChannels {
  private readonly handlers = new Map<number, () => void>();
  private waiting?: Promise<void>;
  private closing = false;
  /** Our two ends of the loopback channel that wakes the waiting thread. */
  private wake?: { listen: number; raise: number };

  constructor(
    private readonly handle: EvtchnHandle,
    private readonly counts: XenCallCounts,
  ) {}

  bind(domid: number, remotePort: number, onEvent: () => void): EventChannel {
    if (this.closing) throw new Error('event channels are closing');
    const local = this.handle.bindInterdomain(domid, remotePort);
    trace(`bind ${domid}:${remotePort} -> ${local}`);
    this.handlers.set(local, onEvent);
    this.waiting ??= this.wait();
    let bound = true;
    return {
      remotePort,
      notify: () => {
        trace(`notify ${local}`);
        if (!bound) return;
        this.counts.notifies++;
        this.handle.notify(local);
      },
      close: () => {
        if (!bound) return;
        bound = false;
        this.handlers.delete(local);
        this.handle.unbind(local);
      },
    };
  }

  private async wait(): Promise<void> {
    for (;;) {
      const port = await this.handle.pending();
      this.counts.pendings++;
      trace(`pending ${port}`);
      if (this.closing) return;
      const handler = this.handlers.get(port);
      // Unmask before handling: a notification that comes while the ring is being
      // read is then seen again rather than lost.
      if (handler) {
        this.counts.unmasks++;
        this.handle.unmask(port);
      }
      handler?.();
    }
  }

  /** Wakes the waiting thread through the loopback channel so the handle can close. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    for (const port of [...this.handlers.keys()]) {
      this.handlers.delete(port);
      this.handle.unbind(port);
    }
    if (this.waiting) {
      try {
        const listen = this.handle.bindUnbound(0);
        const raise = this.handle.bindInterdomain(0, listen);
        this.wake = { listen, raise };
        this.handle.notify(raise);
      } catch {
        // No loopback: the thread stays blocked; the handle is left open for process exit.
        return;
      }
      await this.waiting.catch(() => undefined);
      this.handle.unbind(this.wake.raise);
      this.handle.unbind(this.wake.listen);
    }
    this.handle.close();
  }
}

/** Grant mapping for one connection to one frontend domain. */
class XenGrantMapper implements GrantMapper {
  readonly access = 'grant map';
  private readonly live = new Set<GrantMapping>();
  private closed = false;

  constructor(
    private readonly gnttab: GntTab,
    readonly domid: number,
    private readonly counts: XenCallCounts,
  ) {}

  private map(refs: number[], writable: boolean): GrantMapping {
    if (this.closed) throw new GrantError('connection closed');
    if (refs.length === 0) throw new GrantError('no grant references to map');
    for (const r of refs) if (!Number.isInteger(r) || r < 0 || r > 0xffffffff) throw new GrantError(`grant reference ${r} is not a 32-bit number`);
    let mapping: GrantMapping;
    try {
      trace(`map ${this.domid} [${refs.join(',')}] ${writable ? 'rw' : 'ro'}`);
      this.counts.grantMaps++;
      mapping = this.gnttab.map(this.domid, refs, writable);
      trace(`mapped at ${mapping.bytes.byteOffset}+${mapping.bytes.length}`);
    } catch (e) {
      throw new GrantError((e as Error).message);
    }
    this.live.add(mapping);
    return mapping;
  }

  private unmap(mapping: GrantMapping): void {
    trace('unmap');
    if (!this.live.delete(mapping)) return;
    this.counts.grantUnmaps++;
    mapping.unmap();
  }

  mapRing(refs: number[]): RingMapping {
    const mapping = this.map(refs, true);
    return { bytes: mapping.bytes, unmap: () => this.unmap(mapping) };
  }

  mapPages(refs: number[], writable: boolean): PageMapping {
    const mapping = this.map(refs, writable);
    const pages = refs.map((_, i) => mapping.bytes.subarray(i * PAGE, (i + 1) * PAGE));
    return { pages, release: () => this.unmap(mapping) };
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const m of this.live) m.unmap();
    this.live.clear();
  }
}


export class XenPlatform implements Platform {
  readonly name = 'xen';
  readonly store: XenStore;
  readonly events: XenEventChannels;
  /**
   * What this platform does for request data: 'copy' or 'map', and why when not asked;
   * `keepPersistent`: grants of frontends that use persistent grants are kept mapped
   * (persistent-grants.ts) unless grant copy was asked for (`--grant-access copy`).
   */
  readonly grantAccess: { mode: 'copy' | 'map'; reason?: string; keepPersistent: boolean };
  private readonly xs: XsHandle;
  private readonly gnttab: GntTab;
  readonly counts: XenCallCounts = { grantCopies: 0, grantCopySegments: 0, grantMaps: 0, grantUnmaps: 0, notifies: 0, pendings: 0, unmasks: 0 };

  /**
   * Opens the three libraries; fails clearly (ENODEV, ENOSYS) where there is no Xen dom0.
   * With grant access `auto` or `copy`, grant copy is probed once (a copy of nothing
   * reaches the ioctl); `copy` fails when it is missing, `auto` maps instead.
   */
  constructor(options: { grants?: GrantAccess; log?: (message: string) => void } = {}) {
    this.xs = new XsHandle();
    try {
      this.gnttab = new GntTab();
      this.events = new XenEventChannels(new EvtchnHandle(), this.counts);
    } catch (e) {
      void this.xs.close();
      throw e;
    }
    this.store = new XenStoreOverLibxenstore(this.xs);
    this.log = options.log;
    const wanted = options.grants ?? 'auto';
    const keepPersistent = wanted !== 'copy';
    if (wanted === 'map') this.grantAccess = { mode: 'map', keepPersistent };
    else {
      const probe = this.gnttab.probeCopy();
      if (probe.ok) this.grantAccess = { mode: 'copy', keepPersistent };
      else if (wanted === 'copy') {
        void this.close();
        throw new Error(`grant copy is not available here (${probe.reason}); use --grant-access map`);
      } else this.grantAccess = { mode: 'map', reason: probe.reason, keepPersistent };
    }
  }

  private readonly log?: (message: string) => void;

  /**
   * A connection's grant access: per request by grant copy or mapping; with persistent
   * grants (and not `--grant-access copy`) the grants kept mapped, per request only what
   * cannot be kept.
   */
  grantsFor(domid: number, options: { persistent: boolean } = { persistent: false }): GrantMapper {
    const mapper = new XenGrantMapper(this.gnttab, domid, this.counts);
    const perRequest = this.grantAccess.mode === 'map' ? mapper : new CopyingGrantMapper(mapper, this.copier, domid, this.log);
    return options.persistent && this.grantAccess.keepPersistent ? new PersistentGrantMapper(mapper, perRequest) : perRequest;
  }

  private readonly copier = {
    copy: (d: number, pieces: CopyPiece[]) => {
      trace(`copy ${d} ${pieces.length} piece(s)`);
      this.counts.grantCopies++;
      this.counts.grantCopySegments += pieces.length;
      try {
        return this.gnttab.copy(d, pieces);
      } catch (e) {
        throw new CopyUnavailable((e as Error).message);
      }
    },
  };

  async close(): Promise<void> {
    const c = this.counts;
    this.log?.(
      `xen platform calls: ${c.grantCopies} grant copies (${c.grantCopySegments} segments), ${c.grantMaps} grant maps, ${c.grantUnmaps} unmaps, ` +
        `${c.notifies} notifies, ${c.pendings} pending waits, ${c.unmasks} unmasks`,
    );
    await this.events.close();
    this.gnttab.close();
    await this.xs.close();
  }
}
