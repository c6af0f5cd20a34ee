/**
 * Socket reads into memory we choose, instead of a fresh buffer per read.
 *
 * A net.Socket normally hands every read to JavaScript in a newly allocated buffer. A
 * stream of 1 MiB NBD writes then allocates ~16 such buffers per request; V8 counts them
 * as external memory and answers with a full garbage collection every few hundred
 * milliseconds, which cost more than the protocol itself (and all of it when the heap
 * holds a filled memory disk). Node can instead read into a caller's buffer (the `onread`
 * option: the kernel copies straight into it, and a function picks the buffer for the
 * next read), but offers that only for sockets it creates itself, never for the sockets a
 * server accepts. This module switches an accepted plain socket to that mode through the
 * same fields the option sets, found by name. When they are not there (another Node),
 * or the socket is TLS (its reads are decrypted first), it changes nothing and says so:
 * the caller keeps reading 'data' events.
 */
import * as net from 'node:net';
import * as tls from 'node:tls';

/** What the socket does with a read: `received` learns of `n` new bytes at the start of `buf`. */
export interface DirectReader {
  /** The buffer the next read lands in (called after every read). */
  next(): Uint8Array;
  /** `n` bytes were read into `buf` (the buffer `next` gave). */
  received(n: number, buf: Uint8Array): void;
}

interface StreamHandle {
  useUserBuffer?(buf: Uint8Array): void;
}

/** Switches `socket` to read through `reader`; false when this Node or socket cannot. */
export function readDirectly(socket: net.Socket, reader: DirectReader): boolean {
  if (socket instanceof tls.TLSSocket) return false;
  const handle = (socket as unknown as { _handle?: StreamHandle | null })._handle;
  if (!handle || typeof handle.useUserBuffer !== 'function') return false;
  const symbols = Object.getOwnPropertySymbols(socket);
  const field = (name: string) => symbols.find((s) => s.description === name);
  const kBuffer = field('kBuffer');
  const kBufferGen = field('kBufferGen');
  const kBufferCb = field('kBufferCb');
  if (!kBuffer || !kBufferGen || !kBufferCb) return false;
  const fields = socket as unknown as Record<symbol, unknown>;
  // Only a socket still in the default mode (all three unset) is switched.
  if (fields[kBuffer] != null || fields[kBufferGen] != null || fields[kBufferCb] != null) return false;
  const first = reader.next();
  fields[kBuffer] = first;
  fields[kBufferGen] = () => reader.next();
  fields[kBufferCb] = (n: number, buf: Uint8Array) => {
    reader.received(n, buf);
  };
  handle.useUserBuffer(first);
  return true;
}
