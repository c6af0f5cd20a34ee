/**
 * The blkif ABI and the back ring, without a frontend: field offsets checked against
 * Xen's headers (a C program compiled here prints offsetof/sizeof), property tests that
 * feed random request slots to the parser, response slots, ring sizes and overrun.
 */
import test from 'ava';
import * as fc from 'fast-check';
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  encodeRequest,
  LAYOUTS,
  MAX_SEGMENTS_PER_REQUEST,
  OP_DISCARD,
  OP_INDIRECT,
  OP_READ,
  OP_WRITE,
  parseRequest,
  responseOperation,
  RSP_ERROR,
  writeResponse,
  type Layout,
} from '../core/ring/abi';
import { BackRing, FrontRing, RingOverrun, ringEntries } from '../core/ring/sring';
import { must, mustRun } from './helpers/run';
import { tempDir } from './helpers/temp';

const layouts = Object.values(LAYOUTS);

test('field offsets and sizes are those of io/blkif.h (x86_64) and Linux blkback’s x86_32 structures', async (t) => {
  const dir = tempDir(t, 'tapkit-abi-');
  const source = path.join(dir, 'offsets.c');
  fs.writeFileSync(
    source,
    `#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <xen/xen.h>
#include <xen/io/blkif.h>
#include <xen/io/ring.h>
DEFINE_RING_TYPES(probe, blkif_request_t, blkif_response_t);
#pragma pack(push, 4)
struct req32 { uint8_t operation; uint8_t nr_segments; blkif_vdev_t handle; uint64_t id; blkif_sector_t sector_number; struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST]; };
struct req32_discard { uint8_t operation; uint8_t flag; blkif_vdev_t handle; uint64_t id; blkif_sector_t sector_number; uint64_t nr_sectors; };
struct req32_indirect { uint8_t operation; uint8_t indirect_op; uint16_t nr_segments; uint64_t id; blkif_sector_t sector_number; blkif_vdev_t handle; uint16_t _pad1; grant_ref_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST]; uint64_t _pad2; };
struct rsp32 { uint64_t id; uint8_t operation; int16_t status; };
#pragma pack(pop)
int main(void) {
  printf("64 %zu %zu %zu %zu %zu %zu %zu %zu\\n", sizeof(blkif_request_t), sizeof(blkif_response_t), offsetof(blkif_request_t, id),
    offsetof(blkif_request_t, sector_number), offsetof(blkif_request_t, seg), offsetof(blkif_request_discard_t, nr_sectors),
    offsetof(blkif_request_indirect_t, handle), offsetof(blkif_request_indirect_t, indirect_grefs));
  printf("32 %zu %zu %zu %zu %zu %zu %zu %zu\\n", sizeof(struct req32), sizeof(struct rsp32), offsetof(struct req32, id),
    offsetof(struct req32, sector_number), offsetof(struct req32, seg), offsetof(struct req32_discard, nr_sectors),
    offsetof(struct req32_indirect, handle), offsetof(struct req32_indirect, indirect_grefs));
  printf("ring %zu %d %d\\n", offsetof(struct probe_sring, ring), BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
  printf("entries %u\\n", (unsigned)__RING_SIZE((struct probe_sring *)0, 4096 << 4));
  return 0;
}
`,
  );
  await must('gcc', ['-Wall', '-o', path.join(dir, 'offsets'), source], { timeoutMs: 60_000 });
  const { stdout } = await mustRun(path.join(dir, 'offsets'), [], { timeoutMs: 10_000 });
  const lines = Object.fromEntries(stdout.trim().split('\n').map((l) => [l.split(' ')[0], l.split(' ').slice(1).map(Number)]));
  for (const [abi, l] of [
    ['64', LAYOUTS['x86_64-abi']],
    ['32', LAYOUTS['x86_32-abi']],
  ] as const) {
    t.deepEqual(lines[abi], [l.slotSize, l.responseSize, l.id, l.sectorNumber, l.segments, l.nrSectors, l.indirectHandle, l.indirectGrefs], `x86_${abi}-abi`);
  }
  t.deepEqual(lines.ring, [64, MAX_SEGMENTS_PER_REQUEST, 8]);
  t.is(lines.entries[0], ringEntries(4096 << 4, LAYOUTS['x86_64-abi'].slotSize));
});

test('ring sizes: one page holds 32 slots in both ABIs; sixteen pages 512', (t) => {
  for (const l of layouts) {
    t.is(ringEntries(4096, l.slotSize), 32);
    t.is(ringEntries(4096 << 4, l.slotSize), 512);
  }
});

test('property: any slot parses without throwing, echoes its id, and answers with its operation (the inner one for INDIRECT)', (t) => {
  fc.assert(
    fc.property(fc.constantFrom(...layouts), fc.uint8Array({ minLength: 112, maxLength: 112 }), fc.constantFrom(0, 11, 256, 4096), (layout, raw, maxIndirect) => {
      const slot = raw.subarray(0, layout.slotSize);
      const request = parseRequest(slot, layout, maxIndirect);
      const view = new DataView(slot.buffer, slot.byteOffset);
      if (request.id !== view.getBigUint64(layout.id, true)) return false;
      const op = slot[0];
      const expected = op === OP_INDIRECT && maxIndirect > 0 ? slot[1] : op;
      return responseOperation(request) === expected;
    }),
    { numRuns: 5000 },
  );
  t.pass();
});

test('property: what parses as a data request has 1..11 sane segments, or 1..max indirect segments with enough indirect pages', (t) => {
  fc.assert(
    fc.property(fc.constantFrom(...layouts), fc.uint8Array({ minLength: 112, maxLength: 112 }), fc.constantFrom(0, 1, 2, 3, 5, 6), (layout, raw, op) => {
      const slot = Uint8Array.from(raw.subarray(0, layout.slotSize));
      slot[0] = op;
      const r = parseRequest(slot, layout, 256);
      if (r.kind === 'rw') {
        if (r.segments.length > MAX_SEGMENTS_PER_REQUEST) return false;
        if ((op === OP_READ || op === OP_WRITE) && r.segments.length === 0) return false;
        return r.segments.every((s) => s.firstSect <= s.lastSect && s.lastSect < 8);
      }
      if (r.kind === 'indirect') return r.nrSegments >= 1 && r.nrSegments <= 256 && r.indirectGrefs.length === Math.ceil(r.nrSegments / 512) && (r.innerOp === OP_READ || r.innerOp === OP_WRITE);
      if (r.kind === 'malformed') return r.status === RSP_ERROR && r.reason.length > 0;
      return r.kind === 'discard' || r.kind === 'unknown';
    }),
    { numRuns: 5000 },
  );
  t.pass();
});

test('property: encode then parse gives the request back (both ABIs)', (t) => {
  const segment = fc.record({ gref: fc.nat({ max: 0xffffffff }), firstSect: fc.integer({ min: 0, max: 7 }), lastSect: fc.integer({ min: 0, max: 7 }) }).map((s) => ({ ...s, lastSect: Math.max(s.firstSect, s.lastSect) }));
  const common = { id: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), handle: fc.nat({ max: 0xffff }), sector: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }) };
  const request = fc.oneof(
    fc.record({ kind: fc.constant('rw' as const), operation: fc.constantFrom(0, 1, 2, 3), ...common, segments: fc.array(segment, { minLength: 1, maxLength: 11 }) }),
    fc.record({ kind: fc.constant('discard' as const), operation: fc.constant(OP_DISCARD), ...common, nrSectors: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), secure: fc.boolean() }),
    fc
      .record({ kind: fc.constant('indirect' as const), operation: fc.constant(OP_INDIRECT), innerOp: fc.constantFrom(0, 1), ...common, nrSegments: fc.integer({ min: 1, max: 4096 }) })
      .chain((r) => fc.array(fc.nat({ max: 0xffffffff }), { minLength: Math.ceil(r.nrSegments / 512), maxLength: Math.ceil(r.nrSegments / 512) }).map((indirectGrefs) => ({ ...r, indirectGrefs }))),
  );
  fc.assert(
    fc.property(fc.constantFrom(...layouts), request, (layout: Layout, r) => {
      const slot = new Uint8Array(layout.slotSize).fill(0xcc);
      encodeRequest(slot, layout, r);
      t.deepEqual(parseRequest(slot, layout, 4096), r);
    }),
    { numRuns: 2000 },
  );
});

test('a parsed request keeps nothing of the slot: rewriting the slot afterwards changes nothing (no double fetch)', (t) => {
  const layout = LAYOUTS['x86_64-abi'];
  const slot = new Uint8Array(layout.slotSize);
  encodeRequest(slot, layout, { kind: 'rw', operation: OP_WRITE, id: 7n, handle: 1, sector: 8n, segments: [{ gref: 9, firstSect: 0, lastSect: 7 }] });
  const parsed = parseRequest(slot, layout, 0);
  const copy = structuredClone(parsed);
  slot.fill(0xff);
  t.deepEqual(parsed, copy);
});

test('responses are exactly the response structure, padding zeroed, nothing else in the slot written', (t) => {
  for (const layout of layouts) {
    const slot = new Uint8Array(layout.slotSize).fill(0xab);
    writeResponse(slot, layout, 0x0102030405060708n, 6, -1);
    t.deepEqual([...slot.subarray(0, 12)], [8, 7, 6, 5, 4, 3, 2, 1, 6, 0, 0xff, 0xff]);
    if (layout.responseSize === 16) t.deepEqual([...slot.subarray(12, 16)], [0, 0, 0, 0]);
    t.true(slot.subarray(layout.responseSize).every((b) => b === 0xab), layout.protocol);
  }
});

test('property: the back ring consumes exactly what the front ring produced, and refuses a req_prod more than a ring ahead', (t) => {
  fc.assert(
    fc.property(fc.constantFrom(...layouts), fc.nat({ max: 0xffffffff }), fc.array(fc.integer({ min: 0, max: 40 }), { minLength: 1, maxLength: 20 }), (layout, start, batches) => {
      const bytes = new Uint8Array(4096);
      const front = new FrontRing(bytes, layout.slotSize);
      front.init();
      // Start anywhere: the indexes are free-running u32s.
      const view = new DataView(bytes.buffer);
      for (const at of [0, 8]) view.setUint32(at, start, true);
      front.reqProdPvt = start;
      front.rspCons = start;
      const back = new BackRing(bytes, layout.slotSize);
      back.reqCons = start;
      back.rspProdPvt = start;
      for (const n of batches) {
        const k = Math.min(n, front.free);
        for (let i = 0; i < k; i++) front.produced();
        front.pushRequests();
        if (back.available() !== k) return false;
        for (let i = 0; i < k; i++) {
          back.take();
          back.produced();
        }
        back.pushResponses();
        if (front.responsesReady() !== k) return false;
        for (let i = 0; i < k; i++) front.takeResponse();
      }
      view.setUint32(0, (back.rspProdPvt + back.entries + 1) >>> 0, true);
      try {
        back.available();
        return false;
      } catch (e) {
        return e instanceof RingOverrun;
      }
    }),
    { numRuns: 500 },
  );
  t.pass();
});
