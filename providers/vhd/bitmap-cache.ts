/**
 * The sector bitmaps of allocated blocks, read on first use and kept in memory. Clean
 * bitmaps are evicted oldest first past a bound; dirty ones (changed since the last
 * flush) stay until the flush writes them.
 */
import type { Provider } from '../../core/provider';

const MAX_CLEAN = 8192;

export class BitmapCache {
  private readonly maps = new Map<number, Uint8Array>();
  private readonly loading = new Map<number, Promise<Uint8Array>>();
  readonly dirty = new Set<number>();

  constructor(
    private readonly lower: Provider,
    private readonly bitmapBytes: number,
    /** The block's current BAT entry (sector of its bitmap), or undefined when unallocated. */
    private readonly entryOf: (block: number) => number | undefined,
  ) {}

  get(block: number): Promise<Uint8Array> | Uint8Array {
    const cached = this.maps.get(block);
    if (cached) return cached;
    const pending = this.loading.get(block);
    if (pending) return pending;
    const entry = this.entryOf(block)!;
    const load = (async () => {
      const map = new Uint8Array(this.bitmapBytes);
      try {
        await this.lower.read(map, entry * 512);
      } finally {
        this.loading.delete(block);
      }
      // The block may have been freed or replaced while we read: keep only a current answer.
      const current = this.maps.get(block);
      if (current) return current;
      if (this.entryOf(block) === entry) this.remember(block, map);
      return map;
    })();
    this.loading.set(block, load);
    return load;
  }

  /** Installs a bitmap made in memory (a new block), dirty. */
  install(block: number, map: Uint8Array): void {
    this.maps.set(block, map);
    this.dirty.add(block);
  }

  markDirty(block: number): void {
    this.dirty.add(block);
  }

  peek(block: number): Uint8Array | undefined {
    return this.maps.get(block);
  }

  forget(block: number): void {
    this.maps.delete(block);
    this.dirty.delete(block);
  }

  private remember(block: number, map: Uint8Array): void {
    this.maps.set(block, map);
    if (this.maps.size <= MAX_CLEAN + this.dirty.size) return;
    for (const key of this.maps.keys()) {
      if (this.maps.size <= MAX_CLEAN + this.dirty.size) break;
      if (!this.dirty.has(key)) this.maps.delete(key);
    }
  }
}
