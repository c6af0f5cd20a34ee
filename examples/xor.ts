/**
 * xor: a filter that XORs every byte with a one-byte key on its way to and from the disk
 * below. Not encryption; an example of a filter that transforms data.
 *
 *   tapkit --plugin ./dist/examples/xor.js info xor,key=0x5a:memory:1G
 *   tapkit --plugin ./dist/examples/xor.js convert --filter xor,key=0x5a disk.img plain.img
 *
 * A filter gets the provider it sits on as `request.lower` and owns it: `close()` closes
 * it. The transformation decides which capabilities survive: a hole below reads as zeros,
 * which this filter turns into the key, so it cannot pass trim or extents through, and it
 * zeroes by writing the key (the VBD does that for it when `zero` is false: it writes
 * zeros through `write`, which XORs them into key bytes).
 */
import { BlockError, OpenRequest, SpecError, provider, type Capabilities, type DiskInfo, type Provider, type WriteOptions } from '../core';

/** Largest scratch buffer a write allocates at once. */
const CHUNK = 1 << 20;

@provider({
  name: 'xor',
  kind: 'filter',
  description: 'example: XORs every byte with a key (xor,key=0x5a:SPEC)',
  options: ['key'],
})
export class XorFilter implements Provider {
  readonly name = 'xor';
  readonly lower: Provider;
  private readonly key: number;

  constructor(request: OpenRequest) {
    if (!request.lower) throw new BlockError('EINVAL', `xor is a filter: it needs a disk below it (in spec '${request.spec}')`);
    this.lower = request.lower;
    this.key = parseKey(request.options.key ?? '0', request.spec);
  }

  get location(): string | undefined {
    return this.lower.location;
  }

  info(): DiskInfo {
    return this.lower.info();
  }

  capabilities(): Capabilities {
    const below = this.lower.capabilities();
    return { ...below, trim: false, zero: false, extents: false };
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    await this.lower.read(buf, offset);
    for (let k = 0; k < buf.length; k++) buf[k] ^= this.key;
  }

  async write(buf: Uint8Array, offset: number, options: WriteOptions): Promise<void> {
    // The caller owns `buf` and may reuse it: transform a copy, never the caller's bytes.
    const scratch = new Uint8Array(Math.min(buf.length, CHUNK));
    for (let done = 0; done < buf.length; done += scratch.length) {
      const n = Math.min(scratch.length, buf.length - done);
      for (let k = 0; k < n; k++) scratch[k] = buf[done + k] ^ this.key;
      const last = done + n === buf.length;
      await this.lower.write!(scratch.subarray(0, n), offset + done, { fua: !!options.fua && last });
    }
  }

  async flush(): Promise<void> {
    await this.lower.flush?.();
  }

  describe(): Record<string, unknown> {
    return { key: `0x${this.key.toString(16).padStart(2, '0')}` };
  }

  async close(): Promise<void> {
    await this.lower.close();
  }
}

function parseKey(text: string, spec: string): number {
  const key = /^0x[0-9a-f]+$/i.test(text) ? parseInt(text.slice(2), 16) : /^\d+$/.test(text) ? Number(text) : NaN;
  if (!(key >= 0 && key <= 255)) throw new SpecError('EINVAL', `xor key '${text}' in spec '${spec}' must be a byte (0..255 or 0x00..0xff)`, true);
  return key;
}
