/**
 * The provider contract: what every source, format and filter implements.
 *
 * Close to nbdkit's plugin callbacks, but async and zero-copy: the caller owns every
 * buffer (an export passes the very memory it will send, or that a guest granted).
 * The VBD checks each request against `info()` and `capabilities()` before a provider
 * sees it, so a provider never defends against an offset past the end or a write to a
 * read-only disk.
 */

export interface DiskInfo {
  /** Virtual size in bytes. Offsets are numbers, exact up to 2^53. */
  size: number;
  /** Smallest unit the provider can address without read-modify-write (usually 512). */
  logicalBlockSize: number;
  /** Preferred I/O unit (a cluster, a block, a page). */
  physicalBlockSize: number;
  readOnly: boolean;
}

export interface Capabilities {
  write: boolean;
  flush: boolean;
  /** Writes may carry FUA: durable before they are acknowledged. */
  fua: boolean;
  trim: boolean;
  /** `zero()` is implemented natively (cheaper than writing zeros). */
  zero: boolean;
  /** `extents()` says something better than "all data". */
  extents: boolean;
  /** A flush on one connection covers writes made through every other one. */
  multiConn: boolean;
  /** Calls may overlap in time; when false the VBD serializes every call. */
  concurrent: boolean;
}

export interface WriteOptions {
  fua?: boolean;
}

export interface ZeroOptions {
  /** The provider may deallocate the range (it must still read back as zeros). */
  mayTrim?: boolean;
  fua?: boolean;
  /** Fail with EOPNOTSUPP rather than fall back to writing zeros slowly (NBD FAST_ZERO). */
  fast?: boolean;
}

/**
 * One run of a disk's allocation map.
 * - `data`: allocated, may hold anything;
 * - `zero`: allocated, reads as zeros;
 * - `hole`: not allocated, reads as zeros.
 */
export type ExtentType = 'data' | 'zero' | 'hole';

export interface Extent {
  offset: number;
  length: number;
  type: ExtentType;
}

export interface Provider {
  /** The registered provider name, used in error messages and `tapkit info`. */
  readonly name: string;

  /**
   * Where the bytes come from: an absolute path or a URL (sources), or the lower
   * provider's location (formats, filters). Backing files are resolved against it.
   */
  readonly location?: string;

  /** The provider this one reads through (formats and filters). */
  readonly lower?: Provider;

  /** For formats with a backing file or parent: the provider chain it opened. */
  readonly backing?: Provider;

  info(): DiskInfo;
  capabilities(): Capabilities;

  /** Fills all of `buf` with the bytes at `offset`. */
  read(buf: Uint8Array, offset: number): Promise<void>;
  /**
   * Optional zero-copy read, for providers that hold the disk in memory: the bytes at
   * [offset, offset+length) as views of the provider's own storage, in order, their lengths
   * summing to `length`. The caller only reads them. A view held after the call (a socket
   * still sending it) shows what later writes put there: use it only where a read concurrent
   * with those writes may return any mix of old and new bytes (an NBD reply not yet sent).
   * A provider that holds only part of the disk in memory (a readahead window) may answer
   * later (a promise) or not at all (undefined): the caller then reads the range with `read`.
   */
  readViews?(offset: number, length: number): Uint8Array[] | undefined | Promise<Uint8Array[] | undefined>;
  /**
   * Optional: the caller is done with views readViews lent (a socket has written them), so
   * a provider that reuses its memory may reuse theirs. Callers need not call it: views
   * never given back are left to the garbage collector, so a provider must not reuse memory
   * it lent before it gets it back. Each lend is given back at most once; views the
   * provider did not lend are ignored.
   */
  returnViews?(views: readonly Uint8Array[]): void;
  write?(buf: Uint8Array, offset: number, options: WriteOptions): Promise<void>;
  flush?(): Promise<void>;
  trim?(offset: number, length: number, options: WriteOptions): Promise<void>;
  zero?(offset: number, length: number, options: ZeroOptions): Promise<void>;
  /** Runs covering [offset, offset+length) in order, without gaps; may stop early but must cover `offset`. */
  extents?(offset: number, length: number): Promise<Extent[]>;

  /** A few format-specific facts for `tapkit info` (version, cluster size, ...). */
  describe?(): Record<string, unknown>;

  /** Bytes actually allocated in the underlying storage, when known. */
  allocatedBytes?(): Promise<number | undefined>;

  /** Releases everything: file descriptors, timers, the lower provider. */
  close(): Promise<void>;
}

export const NO_CAPABILITIES: Capabilities = Object.freeze({
  write: false,
  flush: false,
  fua: false,
  trim: false,
  zero: false,
  extents: false,
  multiConn: false,
  concurrent: false,
});
