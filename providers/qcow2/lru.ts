/**
 * A small bounded LRU of loaded L2 tables, keyed by host
 * offset. It holds promises, so concurrent requests for one table share one read; a
 * failed load is forgotten so that the next request tries again. A table whose load has
 * finished can also be had without waiting (`peek`), which spares a read of a cached
 * table the promise machinery.
 */
export class PromiseLru<V> {
  private readonly entries = new Map<number, { pending: Promise<V>; value?: V }>();

  constructor(readonly capacity: number) {
    if (!(capacity >= 1)) throw new Error('PromiseLru capacity must be at least 1');
  }

  get(key: number, load: () => Promise<V>): Promise<V> {
    const hit = this.entries.get(key);
    if (hit) {
      this.touch(key, hit);
      return hit.pending;
    }
    const pending = load();
    const entry: { pending: Promise<V>; value?: V } = { pending };
    this.entries.set(key, entry);
    pending.then(
      (value) => {
        entry.value = value;
      },
      () => {
        if (this.entries.get(key) === entry) this.entries.delete(key);
      },
    );
    while (this.entries.size > this.capacity) {
      const oldest = this.entries.keys().next().value as number;
      this.entries.delete(oldest);
    }
    return pending;
  }

  /** The loaded value at `key`, marked as most recently used; undefined when absent or still loading. */
  peek(key: number): V | undefined {
    const hit = this.entries.get(key);
    if (hit?.value === undefined) return undefined;
    this.touch(key, hit);
    return hit.value;
  }

  /** Re-inserts an entry: Map iteration order is insertion order, so the oldest is first. */
  private touch(key: number, entry: { pending: Promise<V>; value?: V }): void {
    this.entries.delete(key);
    this.entries.set(key, entry);
  }

  get size(): number {
    return this.entries.size;
  }

  clear(): void {
    this.entries.clear();
  }
}

/**
 * Decoded clusters, keyed by host offset, in buffers that are recycled: a miss decodes
 * into the buffer of the entry it evicts, so a steady stream of misses allocates nothing.
 * Safe because every use is synchronous: `fill` decodes and stores, and callers copy out
 * of an entry before they next await, so no buffer is overwritten while someone reads it.
 */
export class ClusterCache {
  private readonly entries = new Map<number, Uint8Array>();

  constructor(
    readonly capacity: number,
    private readonly clusterSize: number,
  ) {
    if (!(capacity >= 1)) throw new Error('ClusterCache capacity must be at least 1');
  }

  /** Clusters held now. */
  get size(): number {
    return this.entries.size;
  }

  /** The cluster at `key`, marked as most recently used; undefined on a miss. */
  get(key: number): Uint8Array | undefined {
    const hit = this.entries.get(key);
    if (hit) {
      this.entries.delete(key);
      this.entries.set(key, hit);
    }
    return hit;
  }

  /** Decodes a missing cluster with `decode(into)` into a recycled (or new) buffer and keeps it. */
  fill(key: number, decode: (into: Uint8Array) => void): Uint8Array {
    const hit = this.get(key);
    if (hit) return hit;
    let buffer: Uint8Array;
    if (this.entries.size >= this.capacity) {
      const [oldest, recycled] = this.entries.entries().next().value as [number, Uint8Array];
      this.entries.delete(oldest);
      buffer = recycled;
    } else {
      buffer = new Uint8Array(this.clusterSize);
    }
    decode(buffer); // a throw leaves the entry out
    this.entries.set(key, buffer);
    return buffer;
  }

  clear(): void {
    this.entries.clear();
  }
}
