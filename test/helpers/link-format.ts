/**
 * A tiny format for testing the opener without a real image format: the image is the
 * text `TAPKIT-LINK <format|-> <backing name>\n` and reads as its backing file.
 * Registered only by tests that import this module.
 */
import { OpenRequest, provider, type Capabilities, type DiskInfo, type Provider } from '../../core';

export const LINK_MAGIC = 'TAPKIT-LINK ';

export function linkImage(backingName: string, format?: string): string {
  return `${LINK_MAGIC}${format ?? '-'} ${backingName}\n`;
}

@provider({
  name: 'testlink',
  kind: 'format',
  description: 'test-only: an image that names its backing file',
  probe: ({ head }) => Buffer.from(head.subarray(0, LINK_MAGIC.length)).toString('latin1') === LINK_MAGIC,
})
export class LinkFormat implements Provider {
  readonly name = 'testlink';
  backing!: Provider;

  constructor(private readonly request: OpenRequest) {}

  get lower(): Provider | undefined {
    return this.request.lower;
  }

  get location(): string | undefined {
    return this.request.lower?.location;
  }

  async open(): Promise<void> {
    const lower = this.request.lower!;
    const text = Buffer.alloc(Math.min(4096, lower.info().size));
    await lower.read(text, 0);
    const line = text.toString('latin1').split('\n')[0].slice(LINK_MAGIC.length);
    const space = line.indexOf(' ');
    const format = line.slice(0, space);
    this.backing = await this.request.openBacking(line.slice(space + 1), format === '-' ? {} : { format });
  }

  info(): DiskInfo {
    return { ...this.backing.info(), readOnly: true };
  }

  capabilities(): Capabilities {
    return { ...this.backing.capabilities(), write: false, fua: false, trim: false, zero: false };
  }

  read(buf: Uint8Array, offset: number): Promise<void> {
    return this.backing.read(buf, offset);
  }

  async close(): Promise<void> {
    await this.backing?.close();
    await this.request.lower?.close();
  }
}
