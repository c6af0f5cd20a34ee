/** The XenStore wire format of Xen's `io/xs_wire.h`: a 16-byte header and a payload. */

export const XS = {
  CONTROL: 0,
  DIRECTORY: 1,
  READ: 2,
  GET_PERMS: 3,
  WATCH: 4,
  UNWATCH: 5,
  TRANSACTION_START: 6,
  TRANSACTION_END: 7,
  INTRODUCE: 8,
  RELEASE: 9,
  GET_DOMAIN_PATH: 10,
  WRITE: 11,
  MKDIR: 12,
  RM: 13,
  SET_PERMS: 14,
  WATCH_EVENT: 15,
  ERROR: 16,
  IS_DOMAIN_INTRODUCED: 17,
  RESUME: 18,
  SET_TARGET: 19,
  RESET_WATCHES: 21,
  DIRECTORY_PART: 22,
} as const;

export const HEADER_SIZE = 16;
export const PAYLOAD_MAX = 4096;

export interface XsMessage {
  type: number;
  reqId: number;
  txId: number;
  payload: Buffer;
}

export function encodeMessage(m: XsMessage): Buffer {
  const out = Buffer.alloc(HEADER_SIZE + m.payload.length);
  out.writeUInt32LE(m.type, 0);
  out.writeUInt32LE(m.reqId >>> 0, 4);
  out.writeUInt32LE(m.txId >>> 0, 8);
  out.writeUInt32LE(m.payload.length, 12);
  m.payload.copy(out, HEADER_SIZE);
  return out;
}

/**
 * Splits a byte stream into messages. Returns the messages complete so far and keeps
 * the rest; throws when a header announces a payload over the protocol's maximum.
 */
export class MessageReader {
  private pending: Buffer = Buffer.alloc(0);

  push(chunk: Buffer): XsMessage[] {
    this.pending = this.pending.length ? Buffer.concat([this.pending, chunk]) : chunk;
    const out: XsMessage[] = [];
    while (this.pending.length >= HEADER_SIZE) {
      const len = this.pending.readUInt32LE(12);
      if (len > PAYLOAD_MAX) throw new RangeError(`payload of ${len} bytes (at most ${PAYLOAD_MAX})`);
      if (this.pending.length < HEADER_SIZE + len) break;
      out.push({
        type: this.pending.readUInt32LE(0),
        reqId: this.pending.readUInt32LE(4),
        txId: this.pending.readUInt32LE(8),
        payload: Buffer.from(this.pending.subarray(HEADER_SIZE, HEADER_SIZE + len)),
      });
      this.pending = this.pending.subarray(HEADER_SIZE + len);
    }
    return out;
  }
}

/** NUL-separated arguments; a trailing NUL ends the last one. */
export function splitArgs(payload: Buffer): string[] {
  let text = payload.toString('utf8');
  if (text.endsWith('\0')) text = text.slice(0, -1);
  return text.split('\0');
}

export function nulTerminated(...parts: string[]): Buffer {
  return Buffer.from(parts.map((p) => `${p}\0`).join(''), 'utf8');
}
