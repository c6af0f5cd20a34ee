/**
 * pattern: a read-only disk whose every byte is computed from its offset.
 *
 *   tapkit --plugin ./dist/examples/pattern.js info pattern:1G
 *
 * Byte i is `(i mod 251) XOR (floor(i / 4096) mod 256)`: 251 is prime, so the bytes do not
 * repeat with any power-of-two period, and the page number mixed in makes every 4 KiB page
 * different. Useful as a source whose contents a test can predict without storing them.
 *
 * This is the whole provider: a class that implements `Provider` and declares itself with
 * `@provider`. The constructor receives the `OpenRequest` (its argument, options, spec) by
 * injection. Inside this repository it imports `../core`; a provider in its own npm package
 * imports the same names from `tapkit`.
 */
import { OpenRequest, SpecError, parseSize, provider, type Capabilities, type DiskInfo, type Provider } from '../core';

/** The byte at offset `i` of every pattern disk. */
export function patternByte(i: number): number {
  return (i % 251) ^ (Math.floor(i / 4096) % 256);
}

@provider({
  name: 'pattern',
  kind: 'source',
  description: 'example: read-only disk where byte i = (i mod 251) xor (i/4096 mod 256) (pattern:SIZE)',
})
export class PatternProvider implements Provider {
  readonly name = 'pattern';
  private readonly size: number;

  constructor(request: OpenRequest) {
    if (request.arg === '') throw new SpecError('EINVAL', `pattern needs a size (pattern:1G) in spec '${request.spec}'`, true);
    this.size = parseSize(request.arg, 'pattern size', request.spec);
  }

  info(): DiskInfo {
    return { size: this.size, logicalBlockSize: 1, physicalBlockSize: 4096, readOnly: true };
  }

  capabilities(): Capabilities {
    // Read-only, and nothing to serialize: every read is a pure function of the offset.
    return { write: false, flush: false, fua: false, trim: false, zero: false, extents: false, multiConn: true, concurrent: true };
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    // The VBD has already checked that [offset, offset + buf.length) lies inside the disk.
    for (let k = 0; k < buf.length; k++) buf[k] = patternByte(offset + k);
  }

  async close(): Promise<void> {
    // Nothing to release: no files, no timers.
  }
}
