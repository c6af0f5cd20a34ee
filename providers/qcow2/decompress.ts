/**
 * Decompression of one compressed cluster. The input is the sector-rounded extent of the
 * descriptor, which usually carries the start of the next compressed cluster after this
 * one's stream: exactly one cluster is decoded and the rest of the input ignored.
 * Output never grows past one cluster, whatever the input claims.
 *
 * - zlib (type 0): raw DEFLATE with Node's zlib, one reused stream decoding straight into
 *   the output (see reusableInflater), or the one-shot API with `maxOutputLength` = one cluster.
 * - zstd (type 1): one zstd frame, decoded by fzstd (pure JS; Node 20's zlib has no zstd).
 *   The frame is delimited here from its block headers, its window is bounded, and the
 *   streaming decoder's output is counted so that it stops past one cluster.
 */
import * as zlib from 'node:zlib';
import { Decompress } from 'fzstd';
import type { CompressionType } from './header';

/** Thrown for input that does not decode to exactly one cluster; the caller names the cluster. */
export class DecompressError extends Error {}

/**
 * Decodes one cluster into `out` (a new buffer when not given; given, it must be exactly
 * one cluster long) and returns it.
 */
export function decompressCluster(type: CompressionType, input: Uint8Array, clusterSize: number, out?: Uint8Array): Uint8Array {
  if (out && out.length !== clusterSize) throw new RangeError(`decompressCluster: output of ${out.length} bytes for a ${clusterSize}-byte cluster`);
  if (type === 'zstd') return zstdCluster(input, clusterSize, out);
  const target = out ?? Buffer.allocUnsafe(clusterSize);
  if (inflateInto(input, target)) return target;
  const whole = inflateCluster(input, clusterSize);
  if (!out) return whole;
  out.set(whole);
  return out;
}

/** The parts of a zlib stream object's native handle used below (zlib.js drives its *Sync functions with them). */
interface InflateHandle {
  reset(): void;
  writeSync(flush: number, input: Uint8Array, inOffset: number, inLength: number, output: Uint8Array, outOffset: number, outLength: number): void;
  close(): void;
  onerror: (message: string, errno: number) => void;
}

/**
 * One raw-inflate stream reused for every cluster. `zlib.inflateRawSync` builds and tears
 * down a zlib stream (a 32 KiB window and its state) and allocates its output on every
 * call, which costs several times the inflate of a well-compressed cluster; a reset
 * stream decodes straight into the caller's buffer. Calls are synchronous, so one stream
 * serves the whole process. Undefined when this Node's stream object does not look as
 * expected: the one-shot API is used then.
 */
let inflater: { stream: zlib.InflateRaw; handle: InflateHandle; state: Uint32Array } | undefined | null;
let inflateError: string | undefined;

function reusableInflater(): typeof inflater {
  if (inflater !== undefined) return inflater;
  const stream = new zlib.InflateRaw();
  const internals = stream as unknown as { _handle?: Partial<InflateHandle>; _writeState?: unknown };
  const handle = internals._handle;
  if (!handle || typeof handle.writeSync !== 'function' || typeof handle.reset !== 'function' || !(internals._writeState instanceof Uint32Array)) {
    stream.close();
    return (inflater = null);
  }
  // Errors come back through this callback, synchronously, instead of destroying the stream.
  handle.onerror = (message: string) => {
    inflateError = message;
  };
  return (inflater = { stream, handle: handle as InflateHandle, state: internals._writeState });
}

/** Where a decode asks for one byte past a full cluster. */
const probe = new Uint8Array(1);

/**
 * Inflates exactly one cluster into `out` with the reused stream. Returns false when
 * there is no reusable stream (the caller falls back); throws DecompressError for data
 * that does not decode to exactly `out.length` bytes.
 *
 * First with Z_FINISH: a stream that ends where the cluster does (what qemu writes) then
 * spares zlib its copy of the last 32 KiB into the sliding window. Whatever else comes
 * out of that pass is decided again with Z_SYNC_FLUSH, whose verdict is the one given:
 * it also accepts a stream that fills the cluster without reaching its end marker (qemu
 * accepts Z_BUF_ERROR for the same reason), which Z_FINISH calls an unexpected end.
 */
function inflateInto(input: Uint8Array, out: Uint8Array): boolean {
  if (!reusableInflater()) return false;
  if (inflatePass(zlib.constants.Z_FINISH, input, out) === undefined) return true;
  const verdict = inflatePass(zlib.constants.Z_SYNC_FLUSH, input, out);
  if (verdict !== undefined) throw new DecompressError(verdict);
  return true;
}

/** One decode of `input` into `out` with `flush`: undefined when it gave exactly one cluster, else why not. */
function inflatePass(flush: number, input: Uint8Array, out: Uint8Array): string | undefined {
  const engine = reusableInflater()!;
  const { handle, state } = engine;
  inflateError = undefined;
  handle.reset();
  handle.writeSync(flush, input, 0, input.length, out, 0, out.length);
  const [outLeft, inLeft] = state;
  if (inflateError === undefined && outLeft === 0) {
    // The cluster is full: one more byte out of the stream means it holds more than a cluster.
    handle.writeSync(flush, input, input.length - inLeft, inLeft, probe, 0, 1);
    if (inflateError === undefined && state[0] === 0) return `deflate data decodes to more than one cluster (${out.length} bytes)`;
  }
  if (inflateError !== undefined) {
    // A stream that failed is not trusted again: the next decode gets a fresh one.
    engine.stream.close();
    inflater = undefined;
    return `deflate data is damaged (${inflateError})`;
  }
  if (outLeft !== 0) return `deflate data decodes to ${out.length - outLeft} bytes, not one cluster (${out.length})`;
  return undefined;
}

function inflateCluster(input: Uint8Array, clusterSize: number): Uint8Array {
  let out: Buffer;
  try {
    // One output chunk of exactly one cluster: no concatenation, nothing beyond it.
    // Z_SYNC_FLUSH: a stream that fills the cluster is good even if the rounded extent cut
    // it before its end marker (qemu accepts Z_BUF_ERROR for the same reason).
    // Synchronous on purpose: a 2 MiB cluster inflates in about a millisecond, and Node's
    // asynchronous one-shot API costs more than that in stream machinery per cluster.
    out = zlib.inflateRawSync(input, { chunkSize: clusterSize, maxOutputLength: clusterSize, finishFlush: zlib.constants.Z_SYNC_FLUSH });
  } catch (error) {
    const tooLarge = (error as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE';
    throw new DecompressError(tooLarge ? `deflate data decodes to more than one cluster (${clusterSize} bytes)` : `deflate data is damaged (${(error as Error).message})`);
  }
  if (out.length !== clusterSize) throw new DecompressError(`deflate data decodes to ${out.length} bytes, not one cluster (${clusterSize})`);
  return out;
}

const ZSTD_MAGIC = 0xfd2fb528;
/** qemu compresses one cluster (at most 2 MiB) per frame; a larger window is not a qemu frame. */
const MAX_ZSTD_WINDOW = 8 * 1024 * 1024;

function zstdCluster(input: Uint8Array, clusterSize: number, into?: Uint8Array): Uint8Array {
  const frame = input.subarray(0, zstdFrameLength(input, clusterSize));
  const out = into ?? new Uint8Array(clusterSize);
  let produced = 0;
  const decoder = new Decompress((chunk) => {
    if (produced + chunk.length > clusterSize) throw new DecompressError(`zstd data decodes to more than one cluster (${clusterSize} bytes)`);
    out.set(chunk, produced);
    produced += chunk.length;
  });
  try {
    decoder.push(frame, true);
  } catch (e) {
    if (e instanceof DecompressError) throw e;
    throw new DecompressError(`zstd data is damaged (${e instanceof Error ? e.message : String(e)})`);
  }
  if (produced !== clusterSize) throw new DecompressError(`zstd data decodes to ${produced} bytes, not one cluster (${clusterSize})`);
  return out;
}

/**
 * Length of the zstd frame at the start of `input`, from its header and block headers,
 * checking on the way that the decoder will not be asked for a huge window.
 */
function zstdFrameLength(input: Uint8Array, clusterSize: number): number {
  const damaged = (why: string) => new DecompressError(`zstd data is damaged (${why})`);
  if (input.length < 6) throw damaged('shorter than a frame header');
  const view = new DataView(input.buffer, input.byteOffset, input.byteLength);
  if (view.getUint32(0, true) !== ZSTD_MAGIC) throw damaged('no zstd frame magic');
  const descriptor = input[4];
  const contentSizeFlag = descriptor >> 6;
  const singleSegment = (descriptor >> 5) & 1;
  if (descriptor & 0x08) throw damaged('reserved frame header bit set');
  const checksum = (descriptor >> 2) & 1;
  const dictionaryBytes = [0, 1, 2, 4][descriptor & 3];
  if (dictionaryBytes) throw damaged('frame needs a dictionary');
  let at = 5;
  let window = 0;
  if (!singleSegment) {
    const exponent = input[at] >> 3;
    const base = 2 ** (10 + exponent);
    window = base + (base / 8) * (input[at] & 7);
    at += 1;
  }
  const contentSizeBytes = contentSizeFlag === 0 ? singleSegment : 2 ** contentSizeFlag;
  if (at + contentSizeBytes > input.length) throw damaged('frame header truncated');
  if (contentSizeBytes) {
    let contentSize = 0;
    for (let i = contentSizeBytes - 1; i >= 0; i--) contentSize = contentSize * 256 + input[at + i];
    if (contentSizeBytes === 2) contentSize += 256;
    if (contentSize !== clusterSize) throw new DecompressError(`zstd frame holds ${contentSize} bytes, not one cluster (${clusterSize})`);
    if (singleSegment) window = contentSize;
  }
  if (window > MAX_ZSTD_WINDOW) throw damaged(`window of ${window} bytes is larger than ${MAX_ZSTD_WINDOW}`);
  at += contentSizeBytes;
  for (;;) {
    if (at + 3 > input.length) throw damaged('block header past the end of the compressed extent');
    const header = input[at] | (input[at + 1] << 8) | (input[at + 2] << 16);
    const last = header & 1;
    const type = (header >> 1) & 3;
    const size = header >> 3;
    if (type === 3) throw damaged('reserved block type');
    at += 3 + (type === 1 ? 1 : size);
    if (at > input.length) throw damaged('block past the end of the compressed extent');
    if (last) break;
  }
  if (checksum) at += 4;
  if (at > input.length) throw damaged('checksum past the end of the compressed extent');
  return at;
}
