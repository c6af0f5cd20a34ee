/**
 * Decompression of one compressed cluster. The input is the sector-rounded extent of the
 * descriptor, which usually carries the start of the next compressed cluster after this
 * one's stream: exactly one cluster is decoded and the rest of the input ignored.
 * Output never grows past one cluster, whatever the input claims.
 *
 * - zlib (type 0): raw DEFLATE with Node's zlib, `maxOutputLength` = one cluster.
 * - zstd (type 1): one zstd frame, decoded by fzstd (pure JS; Node 20's zlib has no zstd).
 *   The frame is delimited here from its block headers, its window is bounded, and the
 *   streaming decoder's output is counted so that it stops past one cluster.
 */
import * as zlib from 'node:zlib';
import { Decompress } from 'fzstd';
import type { CompressionType } from './header';

/** Thrown for input that does not decode to exactly one cluster; the caller names the cluster. */
export class DecompressError extends Error {}

export function decompressCluster(type: CompressionType, input: Uint8Array, clusterSize: number): Uint8Array {
  return type === 'zlib' ? inflateCluster(input, clusterSize) : zstdCluster(input, clusterSize);
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

function zstdCluster(input: Uint8Array, clusterSize: number): Uint8Array {
  const frame = input.subarray(0, zstdFrameLength(input, clusterSize));
  const out = new Uint8Array(clusterSize);
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
