/**
 * A small bounded LRU of loaded tables (L2 tables, decompressed clusters), keyed by host
 * offset. It holds promises, so concurrent requests for one table share one read; a
 * failed load is forgotten so that the next request tries again.
 */
export class PromiseLru<V> {
  private readonly entries = new Map<number, Promise<V>>();

  constructor(readonly capacity: number) {
    if (!(capacity >= 1)) throw new Error('PromiseLru capacity must be at least 1');
  }

  get(key: number, load: () => Promise<V>): Promise<V> {
    const hit = this.entries.get(key);
    if (hit) {
      // Re-insert: Map iteration order is insertion order, so the oldest is first.
      this.entries.delete(key);
      this.entries.set(key, hit);
      return hit;
    }
    const pending = load();
    this.entries.set(key, pending);
    pending.catch(() => {
      if (this.entries.get(key) === pending) this.entries.delete(key);
    });
    while (this.entries.size > this.capacity) {
      const oldest = this.entries.keys().next().value as number;
      this.entries.delete(oldest);
    }
    return pending;
  }

  get size(): number {
    return this.entries.size;
  }

  clear(): void {
    this.entries.clear();
  }
}
