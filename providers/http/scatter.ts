import type { BodySink } from './connection';

/** Buffers a body fills in order, as if they were one. */
export class Scatter implements BodySink {
  readonly length: number;
  remaining: number;
  private index = 0;
  private within = 0;
  constructor(private readonly targets: readonly Uint8Array[]) {
    this.length = targets.reduce((sum, t) => sum + t.length, 0);
    this.remaining = this.length;
    this.advance(0); // past empty targets
  }

  window(max: number): Uint8Array {
    const target = this.targets[this.index];
    return target.subarray(this.within, Math.min(target.length, this.within + max));
  }

  advance(n: number): void {
    this.within += n;
    this.remaining -= n;
    while (this.index < this.targets.length && this.within === this.targets[this.index].length) {
      this.index++;
      this.within = 0;
    }
  }

  put(bytes: Uint8Array): void {
    let from = 0;
    while (from < bytes.length) {
      const into = this.window(bytes.length - from);
      into.set(bytes.subarray(from, from + into.length));
      from += into.length;
      this.advance(into.length);
    }
  }
}
