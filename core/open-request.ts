/**
 * What a provider is given when it is opened. Injected into the provider's constructor
 * (`constructor(private readonly request: OpenRequest)`).
 */
import type { Provider } from './provider';

export interface BackingOptions {
  /** A format named by the image (qcow2 backing-format, VHD's implied format); probed when absent. */
  format?: string;
}

export class OpenRequest {
  constructor(
    /** The spec text that named this provider, for error messages. */
    readonly spec: string,
    /** Sources: the text after `name:` (a size, a path, a URL). Formats and filters: the inner spec. */
    readonly arg: string,
    /** `name,key=value,...:arg` options, already checked against the declaration. */
    readonly options: Readonly<Record<string, string>>,
    /** Formats and filters: the provider they sit on. */
    readonly lower: Provider | undefined,
    /** Open read-only (backing files always are). */
    readonly readOnly: boolean,
    /**
     * Opens a backing file or parent named inside an image, resolved against this
     * image's location, confined by the open policy, and counted against chain depth
     * and cycles. The result is read-only.
     */
    readonly openBacking: (name: string, options?: BackingOptions) => Promise<Provider>,
    /** Reports a non-fatal problem (a footer repaired from its copy, a dirty image). */
    readonly warn: (message: string) => void,
    /**
     * A backing file's source: the image that named it (so an http source can reuse the
     * credentials and settings of the image it is the backing file of, on the same origin).
     */
    readonly namedBy?: Provider,
  ) {}

  /** The location backing names are resolved against (the lower provider's). */
  get location(): string | undefined {
    return this.lower?.location;
  }
}
