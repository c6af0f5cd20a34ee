/**
 * The three things a blkif backend needs from the machine it runs on, as small
 * interfaces: grant mapping, event channels and XenStore. `sim/` implements them with
 * files and Unix sockets (XENSIM.md); a `xen` implementation (a real dom0) binds
 * libxengnttab, libxenevtchn and libxenstore behind the same interfaces and registers
 * itself with `registerPlatformKind('xen', ...)` (platforms.ts). These interfaces are the
 * whole contract between the ring engine (queue.ts, device.ts) and a platform; keep them
 * small and change them only with both sides.
 *
 * What the engine promises a platform:
 *  - everything runs on the Node.js event loop (no threads); calls never overlap a
 *    platform's own callbacks;
 *  - one GrantMapper per connection (a frontend's Initialised..Closing): every mapRing is
 *    unmapped and every mapPages released before `close()`, and no I/O touches a page
 *    after its release;
 *  - it never writes a grant table, and never binds the same (domid, port) twice.
 *
 * What a platform promises the engine:
 *  - refusals are GrantError (a request answered BLKIF_RSP_ERROR or a failed connection),
 *    never a crash; a mapping is all or nothing;
 *  - `onEvent` runs on a later turn of the event loop, never inside `bind` or `notify`;
 *    notifications may coalesce (the engine always re-checks its ring);
 *  - XenStore paths are absolute; a missing node reads as `undefined` and lists as
 *    `[]`; `rm` of a missing node succeeds; a watch fires once when set (asynchronously)
 *    and then on every change at or below its path; a conflicting commit resolves
 *    `false` (EAGAIN), any other failure rejects.
 */

/** Grant access for one connection to one frontend domain. */
export interface GrantMapper {
  /**
   * Maps the ring pages as one virtually contiguous, writable region (multi-page ring
   * slots straddle page boundaries). Released with `unmapRing`.
   */
  mapRing(refs: number[]): RingMapping;
  /**
   * Maps data pages, all or nothing: throws GrantError if any reference is refused.
   * `writable`: the backend will write into them (a READ request). Each page is a
   * 4096-byte view of the mapped memory, valid until `release()` (adjacent views of one
   * region may be merged into one I/O). With persistent grants the platform may keep the
   * mappings until `close()`; `release()` is still called once per `mapPages`.
   * `spans` (optional, one per ref) are the bytes of each page the request uses; a
   * platform that copies instead of mapping (grant-copy.ts) moves only those.
   */
  mapPages(refs: number[], writable: boolean, spans?: PageSpan[]): PageMapping;
  /** Drops every mapping this connection made (persistent ones included). */
  close(): void;
  /** How data moves ('grant map', 'grant copy', ...), for the connect log; optional. */
  readonly access?: string;
}

export interface RingMapping {
  readonly bytes: Uint8Array;
  /**
   * Optional: throws GrantError when `bytes` can no longer be touched safely (on `sim`,
   * a guest that shrank its memory file under the mapping). The engine calls it before
   * each stretch of work on the ring; a platform whose mappings cannot vanish leaves it out.
   */
  check?(): void;
  unmap(): void;
}

export interface PageMapping {
  readonly pages: Uint8Array[];
  /** `completed` false: the I/O failed, a copying platform need not write the pages back. */
  release(completed?: boolean): void;
}

/** The sectors (512 bytes each, inclusive) of one granted page a request segment uses. */
export interface PageSpan {
  readonly firstSect: number;
  readonly lastSect: number;
}

export class GrantError extends Error {}

/** An event channel bound to a frontend's port. */
export interface EventChannel {
  readonly remotePort: number;
  /** Raises the channel towards the frontend; never blocks, may coalesce. */
  notify(): void;
  /** Unbinds (idempotent); no `onEvent` runs afterwards. */
  close(): void;
}

export interface EventChannels {
  /**
   * Binds to (domid, remotePort); `onEvent` runs for every notification the frontend
   * raises (coalesced). Throws (an Error) when the port cannot be bound: the engine
   * fails that connection.
   */
  bind(domid: number, remotePort: number, onEvent: () => void): EventChannel;
}

/** A XenStore transaction id; 0 is "no transaction". */
export type TxId = number;

export interface XenStore {
  read(path: string, tx?: TxId): Promise<string | undefined>;
  write(path: string, value: string, tx?: TxId): Promise<void>;
  directory(path: string, tx?: TxId): Promise<string[]>;
  rm(path: string, tx?: TxId): Promise<void>;
  /** Sets a watch; `onChange(path)` fires once at once and then on every change at or below. */
  watch(path: string, onChange: (path: string) => void): Promise<Watch>;
  transactionStart(): Promise<TxId>;
  /**
   * Sets a node's permissions in Xen's letters, owner first (`['n5', 'r0']`: domain 5
   * owns it, domain 0 may read). Optional: only a real XenStore enforces permissions;
   * on the sim every connection is privileged.
   */
  setPermissions?(path: string, permissions: string[], tx?: TxId): Promise<void>;
  /** Commits (or aborts); resolves false when a commit conflicted (EAGAIN). */
  transactionEnd(tx: TxId, commit: boolean): Promise<boolean>;
}

export interface Watch {
  cancel(): Promise<void>;
}

/** A platform: what `tapkit xen serve --platform ...` runs the backend on. */
export interface Platform {
  readonly name: string;
  readonly store: XenStore;
  readonly events: EventChannels;
  /**
   * Grant access to one frontend domain, for one connection (throws GrantError when the
   * guest's memory cannot be reached). `persistent`: both ends agreed on persistent grants.
   */
  grantsFor(domid: number, options: { persistent: boolean }): GrantMapper;
  close(): Promise<void>;
}

/** Runs `body` in a transaction, retrying on EAGAIN (a bounded number of times). */
export async function inTransaction<T>(store: XenStore, body: (tx: TxId) => Promise<T>, attempts = 100): Promise<T> {
  for (let i = 0; i < attempts; i++) {
    const tx = await store.transactionStart();
    let result: T;
    try {
      result = await body(tx);
    } catch (e) {
      await store.transactionEnd(tx, false).catch(() => undefined);
      throw e;
    }
    if (await store.transactionEnd(tx, true)) return result;
  }
  throw new Error(`XenStore transaction still conflicting after ${attempts} attempts`);
}
