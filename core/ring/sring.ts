/**
 * The backend's half of a shared ring (`io/ring.h`), over bytes that the frontend maps
 * too. The shared header holds four free-running u32 indexes; the backend's private
 * state (req_cons, rsp_prod_pvt) lives here, never in shared memory.
 *
 * Every read of a shared index is one load, used once. Where ring.h puts a full memory
 * barrier (publish an index, then read the other side's event index) we use an atomic
 * read-modify-write on a private SharedArrayBuffer: on x86 a locked instruction orders
 * every earlier store before every later load, whatever memory they touch.
 */
import { PAGE } from './abi';

const REQ_PROD = 0;
const REQ_EVENT = 4;
const RSP_PROD = 8;
const RSP_EVENT = 12;
export const SRING_HEADER = 64;

const fenceWord = new Int32Array(new SharedArrayBuffer(4));
/** A full memory barrier (store→load ordering). */
export function fullBarrier(): void {
  Atomics.add(fenceWord, 0, 1);
}

/** `__RING_SIZE`: entries in a ring of `bytes` bytes, rounded down to a power of two. */
export function ringEntries(bytes: number, slotSize: number): number {
  const fit = Math.floor((bytes - SRING_HEADER) / slotSize);
  let n = 1;
  while (n * 2 <= fit) n *= 2;
  return fit >= 1 ? n : 0;
}

export class RingOverrun extends Error {}

export class BackRing {
  readonly entries: number;
  private readonly view: DataView;
  /** Next request slot to consume. */
  reqCons = 0;
  /** Next response slot to fill (private until pushed). */
  rspProdPvt = 0;
  /** Where `take()` copies a request slot (one allocation per ring, not per request). */
  private readonly scratch: Uint8Array;

  constructor(
    readonly bytes: Uint8Array,
    readonly slotSize: number,
  ) {
    if (bytes.length < PAGE) throw new RangeError('a ring is at least one page');
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
    this.entries = ringEntries(bytes.length, slotSize);
    this.scratch = new Uint8Array(slotSize);
  }

  private u32(at: number): number {
    return this.view.getUint32(at, true);
  }

  private setU32(at: number, value: number): void {
    this.view.setUint32(at, value >>> 0, true);
  }

  /** The slot's bytes for ring index `idx` (a view of shared memory). */
  slot(idx: number): Uint8Array {
    const at = SRING_HEADER + (idx & (this.entries - 1)) * this.slotSize;
    return this.bytes.subarray(at, at + this.slotSize);
  }

  /**
   * The requests the frontend has produced that we may consume now: [reqCons, end).
   * Throws RingOverrun when the frontend claims more requests than the ring holds.
   */
  available(): number {
    const prod = this.u32(REQ_PROD);
    fullBarrier(); // read req_prod before the slots it covers
    if (((prod - this.rspProdPvt) >>> 0) > this.entries) {
      throw new RingOverrun(`req_prod ${prod} is more than ${this.entries} ahead of the responses (${this.rspProdPvt})`);
    }
    const unconsumed = (prod - this.reqCons) >>> 0;
    const room = this.entries - ((this.reqCons - this.rspProdPvt) >>> 0);
    return Math.min(unconsumed, room);
  }

  /**
   * Copies the next request slot out of shared memory (once) and consumes it. The copy
   * is private to the backend but reused: it is valid until the next `take()` (parse it
   * before taking another).
   */
  take(): Uint8Array {
    this.scratch.set(this.slot(this.reqCons));
    this.reqCons = (this.reqCons + 1) >>> 0;
    return this.scratch;
  }

  /** The slot the next response goes into; call `produced()` after writing it. */
  nextResponseSlot(): Uint8Array {
    return this.slot(this.rspProdPvt);
  }

  produced(): void {
    this.rspProdPvt = (this.rspProdPvt + 1) >>> 0;
  }

  /** RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publishes responses; true if the frontend wants a kick. */
  pushResponses(): boolean {
    const old = this.u32(RSP_PROD);
    const now = this.rspProdPvt;
    if (old === now) return false;
    fullBarrier(); // responses before the index that publishes them
    this.setU32(RSP_PROD, now);
    fullBarrier(); // the index before reading rsp_event
    const event = this.u32(RSP_EVENT);
    return ((now - event) >>> 0) < ((now - old) >>> 0);
  }

  /**
   * RING_FINAL_CHECK_FOR_REQUESTS: when nothing is waiting, asks the frontend to kick us
   * for the next request (req_event), then looks once more to close the race with a
   * frontend that produced meanwhile. True if there is work.
   */
  finalCheck(): boolean {
    if (this.available() > 0) return true;
    this.setU32(REQ_EVENT, this.reqCons + 1);
    fullBarrier();
    return this.available() > 0;
  }

  /** True when every consumed request has been answered. */
  get idle(): boolean {
    return this.reqCons === this.rspProdPvt;
  }
}

/** The frontend's half (used by the TypeScript frontend in tests and tools). */
export class FrontRing {
  readonly entries: number;
  private readonly view: DataView;
  reqProdPvt = 0;
  rspCons = 0;

  constructor(
    readonly bytes: Uint8Array,
    readonly slotSize: number,
  ) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
    this.entries = ringEntries(bytes.length, slotSize);
  }

  /** SHARED_RING_INIT + FRONT_RING_INIT. */
  init(): void {
    this.bytes.fill(0, 0, SRING_HEADER);
    this.view.setUint32(REQ_EVENT, 1, true);
    this.view.setUint32(RSP_EVENT, 1, true);
    this.reqProdPvt = 0;
    this.rspCons = 0;
  }

  slot(idx: number): Uint8Array {
    const at = SRING_HEADER + (idx & (this.entries - 1)) * this.slotSize;
    return this.bytes.subarray(at, at + this.slotSize);
  }

  get free(): number {
    return this.entries - ((this.reqProdPvt - this.rspCons) >>> 0);
  }

  /** The slot for the next request; call `produced()` after filling it. */
  nextRequestSlot(): Uint8Array {
    return this.slot(this.reqProdPvt);
  }

  produced(): void {
    this.reqProdPvt = (this.reqProdPvt + 1) >>> 0;
  }

  /** RING_PUSH_REQUESTS_AND_CHECK_NOTIFY. */
  pushRequests(): boolean {
    const old = this.view.getUint32(REQ_PROD, true);
    const now = this.reqProdPvt;
    fullBarrier();
    this.view.setUint32(REQ_PROD, now, true);
    fullBarrier();
    const event = this.view.getUint32(REQ_EVENT, true);
    return ((now - event) >>> 0) < ((now - old) >>> 0);
  }

  /** Responses ready to read: [rspCons, rsp_prod). */
  responsesReady(): number {
    const prod = this.view.getUint32(RSP_PROD, true);
    fullBarrier();
    return (prod - this.rspCons) >>> 0;
  }

  /** RING_FINAL_CHECK_FOR_RESPONSES. */
  finalCheck(): boolean {
    if (this.responsesReady() > 0) return true;
    this.view.setUint32(RSP_EVENT, this.rspCons + 1, true);
    fullBarrier();
    return this.responsesReady() > 0;
  }

  takeResponse(): Uint8Array {
    const copy = new Uint8Array(this.slotSize);
    copy.set(this.slot(this.rspCons));
    this.rspCons = (this.rspCons + 1) >>> 0;
    return copy;
  }
}
