/**
 * The blkif backend on the sim platform, driven by the TypeScript frontend: the C
 * frontend's scenarios (both ABIs), plus what is easier to stage from here: hostile
 * transport keys and missing guest files (XENSIM.md settled detail 9), random request
 * slots on a live ring, a hostile device beside a well-behaved one, hot-unplug, and the
 * notification hold-off counted.
 */
import test, { type ExecutionContext } from 'ava';
import * as fc from 'fast-check';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { LAYOUTS, OP_DISCARD, OP_FLUSH_DISKCACHE, OP_INDIRECT, OP_READ, OP_WRITE, OP_WRITE_BARRIER, PAGE, RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY } from '../core/ring/abi';
import { XenbusState } from '../core/ring/device';
import type { TxId, XenStore } from '../core/ring/platform';
import { XsClient } from '../core/ring/sim/xs-client';
import { detach } from '../core/ring/toolstack';
import { firstMismatch, readProvider, SimBackend } from './xen/harness';
import { fillPattern, firstPatternMismatch, type FrontendOptions, TsFrontend } from './xen/ts-frontend';

const DOMID = 5;
const DEVID = 51712;
const SPEC = 'memory:64M';

async function setup(
  t: ExecutionContext,
  options: FrontendOptions = {},
  spec = SPEC,
  readOnly = false,
  simOptions: Parameters<typeof SimBackend.start>[0] = {},
): Promise<{ sim: SimBackend; fe: TsFrontend }> {
  const sim = await SimBackend.start(simOptions);
  t.teardown(() => sim.close());
  await sim.attach(DOMID, DEVID, spec, readOnly);
  await sim.waitForDevice(DOMID, DEVID);
  const fe = await TsFrontend.open(sim.dir, DOMID, DEVID, options);
  t.teardown(() => fe.close());
  return { sim, fe };
}

/** Waits (at most 30 s) until the backend serves no device any more. */
async function untilNoDevice(sim: SimBackend): Promise<void> {
  for (const deadline = Date.now() + 30_000; sim.backend.active.size > 0 && Date.now() < deadline; ) await new Promise((r) => setTimeout(r, 20));
}

async function holdsPattern(t: ExecutionContext, sim: SimBackend, sector: number, pages: number, seed: number, spec = SPEC): Promise<void> {
  const data = await readProvider(sim.providers.get(spec)!, sector * 512, pages * 4096);
  t.is(firstMismatch(data, sector * 512, seed), -1, `pattern at sector ${sector}`);
}

const H = DEVID & 0xffff;

for (const abi of [64, 32] as const) {
  test.serial(`ts x86_${abi}-abi: handshake, writes and reads checked against the provider, sub-page segments, the end of the disk`, async (t) => {
    const { sim, fe } = await setup(t, { abi });
    t.is(await sim.platform.store.read(`${fe.be}/sector-size`), '512');
    await fe.connect();
    t.is(fe.sectors, 64 * 2048);
    await fe.writeAndRead(0, 64, 7);
    await fe.writeAndRead(2048, 11, 7);
    await holdsPattern(t, sim, 0, 64, 7);
    await holdsPattern(t, sim, 2048, 11, 7);
    // Sectors 2..5 of a page: only those reach the disk.
    const page = fe.mem.allocPages(1);
    fillPattern(fe.mem.page(page), 4096 * 512 - 2 * 512, 7);
    const w = await fe.send({ kind: 'rw', operation: OP_WRITE, handle: H, sector: 4096n, segments: [{ gref: fe.mem.grant(page, true), firstSect: 2, lastSect: 5 }] });
    t.deepEqual([w.status, w.operation], [RSP_OKAY, OP_WRITE]);
    const sub = await readProvider(sim.providers.get(SPEC)!, 4096 * 512, 2048);
    t.is(firstMismatch(sub, 4096 * 512, 7), -1);
    // A read that passes the end is refused; the last page is served.
    const last = fe.mem.allocPages(1);
    const past = await fe.send({ kind: 'rw', operation: OP_READ, handle: H, sector: BigInt(fe.sectors - 4), segments: [fe.segment(last, false)] });
    t.is(past.status, RSP_ERROR);
    const end = await fe.send({ kind: 'rw', operation: OP_READ, handle: H, sector: BigInt(fe.sectors - 8), segments: [fe.segment(last, false)] });
    t.is(end.status, RSP_OKAY);
    await fe.disconnect();
  });

  test.serial(`ts x86_${abi}-abi: indirect requests of 256 segments; too many segments and a non-data inner operation refused`, async (t) => {
    const { sim, fe } = await setup(t, { abi });
    await fe.connect();
    t.is(fe.maxIndirect, 256);
    const n = fe.maxIndirect;
    const src = fe.mem.allocPages(n);
    const dst = fe.mem.allocPages(n);
    fillPattern(fe.mem.bytes.subarray(src * PAGE, (src + n) * PAGE), 32768 * 512, 3);
    const indirect = (op: number, first: number, count: number, readOnly: boolean) => {
      const pages = Math.ceil(count / 512);
      const ip = fe.mem.allocPages(pages);
      const descriptors = fe.mem.bytes.subarray(ip * PAGE, (ip + pages) * PAGE);
      for (let i = 0; i < count; i++) {
        descriptors.writeUInt32LE(fe.mem.grant(first + (i % n), readOnly), i * 8);
        descriptors[i * 8 + 4] = 0;
        descriptors[i * 8 + 5] = 7;
      }
      const grefs = Array.from({ length: pages }, (_, p) => fe.mem.grant(ip + p, true));
      return fe.send({ kind: 'indirect', operation: OP_INDIRECT, innerOp: op, handle: H, sector: 32768n, nrSegments: count, indirectGrefs: grefs });
    };
    const w = await indirect(OP_WRITE, src, n, true);
    t.deepEqual([w.status, w.operation], [RSP_OKAY, OP_WRITE], 'the response carries the inner operation');
    const r = await indirect(OP_READ, dst, n, false);
    t.is(r.status, RSP_OKAY);
    t.is(firstPatternMismatch(fe.mem.bytes.subarray(dst * PAGE, (dst + n) * PAGE), 32768 * 512, 3), -1);
    await holdsPattern(t, sim, 32768, n, 3);
    const big = await indirect(OP_READ, dst, n + 1, false);
    t.deepEqual([big.status, big.operation], [RSP_ERROR, OP_READ]);
    const flush = await indirect(OP_FLUSH_DISKCACHE, dst, 1, false);
    t.deepEqual([flush.status, flush.operation], [RSP_ERROR, OP_FLUSH_DISKCACHE]);
    await fe.disconnect();
  });
}

test.serial('ts: a 16-page ring kept full and wrapped many times, served in batches with few notifications', async (t) => {
  const { sim, fe } = await setup(t, { order: 4 });
  await fe.connect();
  const Q = fe.queues[0];
  t.is(Q.ring.entries, 512);
  const page = fe.mem.allocPages(1);
  const ref = fe.mem.grant(page, false);
  const total = 5000;
  let sent = 0;
  const inFlight = new Set<Promise<unknown>>();
  while (sent < total) {
    while (sent < total && Q.ring.free > 0) {
      const p: Promise<unknown> = fe.put({ kind: 'rw', operation: OP_READ, handle: H, sector: BigInt((sent % 4096) * 8), segments: [{ gref: ref, firstSect: 0, lastSect: 7 }] }).then(() => inFlight.delete(p));
      inFlight.add(p);
      sent++;
    }
    fe.push();
    await Promise.race(inFlight);
  }
  await Promise.all(inFlight);
  t.is(fe.responses.length, total);
  t.true(fe.responses.every((r) => r.status === RSP_OKAY));
  const stats = sim.backend.active.get(`${DOMID}/${DEVID}`)!.stats();
  t.log(`kicks sent ${stats.kicksSent}, received ${stats.kicksReceived}, batches ${stats.batches} for ${total} requests`);
  t.is(stats.requests, total);
  t.true(stats.kicksSent < total / 2, `kicks sent ${stats.kicksSent} for ${total} requests`);
  t.true(stats.kicksReceived < total / 2, `kicks received ${stats.kicksReceived} for ${total} requests`);
  await fe.disconnect();
});

test.serial('ts: a full one-page ring is answered half a ring at a time, so the frontend can refill while the backend works', async (t) => {
  const { fe } = await setup(t);
  await fe.connect();
  const Q = fe.queues[0];
  t.is(Q.ring.entries, 32);
  const page = fe.mem.allocPages(1);
  const ref = fe.mem.grant(page, false);
  // How many responses the frontend holds after each notification (its own listener reaps first).
  const seen: number[] = [];
  const stop = fe.events.onEvent(() => seen.push(fe.responses.length));
  t.teardown(stop);
  const all = Array.from({ length: 32 }, (_, i) => fe.put({ kind: 'rw', operation: OP_READ, handle: H, sector: BigInt(i * 8), segments: [{ gref: ref, firstSect: 0, lastSect: 7 }] }));
  fe.push();
  const responses = await Promise.all(all);
  t.true(responses.every((r) => r.status === RSP_OKAY));
  t.log(`responses held after each notification: ${seen.join(', ')}`);
  t.true(seen.length >= 2, 'more than one notification');
  t.true(seen[0] > 0 && seen[0] <= 16, `the first notification came with ${seen[0]} responses, not the whole ring`);
  await fe.disconnect();
});

test.serial('ts: flush, flush with data, barriers with and without data', async (t) => {
  const { sim, fe } = await setup(t);
  await fe.connect();
  t.is(await sim.platform.store.read(`${fe.be}/feature-flush-cache`), '1');
  t.is(await sim.platform.store.read(`${fe.be}/feature-barrier`), '1');
  await fe.writeAndRead(8192, 8, 11);
  const page = fe.mem.allocPages(2);
  fillPattern(fe.mem.page(page), (8192 + 64) * 512, 11);
  fillPattern(fe.mem.page(page + 1), (8192 + 72) * 512, 11);
  const f = fe.put({ kind: 'rw', operation: OP_FLUSH_DISKCACHE, handle: H, sector: 8192n + 64n, segments: [fe.segment(page, true)] });
  const w = fe.put({ kind: 'rw', operation: OP_WRITE_BARRIER, handle: H, sector: 8192n + 72n, segments: [fe.segment(page + 1, true)] });
  const z = fe.put({ kind: 'rw', operation: OP_WRITE_BARRIER, handle: H, sector: 0n, segments: [] });
  const e = fe.put({ kind: 'rw', operation: OP_FLUSH_DISKCACHE, handle: H, sector: 0n, segments: [] });
  fe.push();
  for (const [r, op] of [
    [await f, OP_FLUSH_DISKCACHE],
    [await w, OP_WRITE_BARRIER],
    [await z, OP_WRITE_BARRIER],
    [await e, OP_FLUSH_DISKCACHE],
  ] as const) t.deepEqual([r.status, r.operation], [RSP_OKAY, op]);
  await holdsPattern(t, sim, 8192 + 64, 2, 11);
  await fe.disconnect();
});

test.serial('ts: discard (keys published), secure discard not offered, discard past the end', async (t) => {
  const { sim, fe } = await setup(t);
  t.is(await sim.platform.store.read(`${fe.be}/feature-discard`), '1');
  t.is(await sim.platform.store.read(`${fe.be}/discard-secure`), '0');
  t.truthy(await sim.platform.store.read(`${fe.be}/discard-granularity`));
  await fe.connect();
  await fe.writeAndRead(16384, 16, 1);
  const d = await fe.send({ kind: 'discard', operation: OP_DISCARD, handle: H, sector: 16384n, nrSectors: 64n, secure: false });
  t.deepEqual([d.status, d.operation], [RSP_OKAY, OP_DISCARD]);
  const s = await fe.send({ kind: 'discard', operation: OP_DISCARD, handle: H, sector: 16384n, nrSectors: 8n, secure: true });
  t.is(s.status, RSP_EOPNOTSUPP);
  const p = await fe.send({ kind: 'discard', operation: OP_DISCARD, handle: H, sector: BigInt(fe.sectors - 8), nrSectors: 16n, secure: false });
  t.is(p.status, RSP_ERROR);
  const huge = await fe.send({ kind: 'discard', operation: OP_DISCARD, handle: H, sector: 2n ** 63n, nrSectors: 2n ** 63n, secure: false });
  t.is(huge.status, RSP_ERROR);
  await fe.disconnect();
});

test.serial('ts: two queues with their own rings and channels, persistent grants, x86_32-abi', async (t) => {
  const { sim, fe } = await setup(t, { queues: 2, persistent: true, abi: 32, order: 1 });
  await fe.connect();
  await Promise.all([fe.writeAndRead(65536, 22, 5, 0), fe.writeAndRead(65536 + 1024, 22, 6, 1)]);
  await holdsPattern(t, sim, 65536, 22, 5);
  await holdsPattern(t, sim, 65536 + 1024, 22, 6);
  t.is(sim.backend.active.get(`${DOMID}/${DEVID}`)!.queueStats.length, 2);
  await fe.disconnect();
});

for (const persistent of [false, true]) {
  test.serial(`ts: ${persistent ? 'with' : 'without'} persistent grants, a grant revoked after use is ${persistent ? 'still mapped (kept for the connection)' : 'refused (the entry is read at every use)'}`, async (t) => {
    const { fe } = await setup(t, { persistent });
    await fe.connect();
    const page = fe.mem.allocPages(1);
    const seg = fe.segment(page, false);
    t.is((await fe.send({ kind: 'rw', operation: OP_READ, handle: H, sector: 0n, segments: [seg] })).status, RSP_OKAY);
    fe.mem.table.bytes.writeUInt16LE(0, seg.gref * 8); // end foreign access
    const again = await fe.send({ kind: 'rw', operation: OP_READ, handle: H, sector: 0n, segments: [seg] });
    t.is(again.status, persistent ? RSP_OKAY : RSP_ERROR);
    await fe.disconnect();
  });
}

test.serial('ts: refused grants (not granted, another domain, read-only for a READ, out of range, transitive) write nothing; later requests succeed', async (t) => {
  const { sim, fe } = await setup(t);
  await fe.connect();
  const page = fe.mem.allocPages(2);
  fe.mem.bytes.fill(0x5a, page * PAGE, (page + 2) * PAGE);
  const refs = [fe.mem.grant(page, false, 0, 0), fe.mem.grant(page, false, 7), fe.mem.grant(page, true), 99999, fe.mem.grant(page, false, 0, 2), fe.mem.grant(1 << 20, false)];
  const answers = refs.map((ref) => fe.put({ kind: 'rw', operation: OP_READ, handle: H, sector: 0n, segments: [fe.segment(page + 1, false), { gref: ref, firstSect: 0, lastSect: 7 }] }));
  // A write whose second segment is refused writes nothing to the disk.
  const src = fe.mem.allocPages(2);
  fe.mem.bytes.fill(0xee, src * PAGE, (src + 2) * PAGE);
  const before = await readProvider(sim.providers.get(SPEC)!, 0, 8192);
  const write = fe.put({ kind: 'rw', operation: OP_WRITE, handle: H, sector: 0n, segments: [fe.segment(src, true), { gref: fe.mem.grant(src + 1, false, 9), firstSect: 0, lastSect: 7 }] });
  fe.push();
  for (const a of await Promise.all(answers)) t.deepEqual([a.status, a.operation], [RSP_ERROR, OP_READ]);
  t.is((await write).status, RSP_ERROR);
  t.true(fe.mem.bytes.subarray(page * PAGE, (page + 2) * PAGE).every((b) => b === 0x5a), 'a refused read wrote guest memory');
  t.deepEqual(await readProvider(sim.providers.get(SPEC)!, 0, 8192), before, 'a refused write reached the disk');
  const unknown = await fe.send({ kind: 'rw', operation: 9, handle: H, sector: 0n, segments: [] });
  t.deepEqual([unknown.status, unknown.operation], [RSP_EOPNOTSUPP, 9]);
  await fe.writeAndRead(0, 4, 9);
  await fe.disconnect();
});

test.serial('ts: a ring overrun gets an error node and Closing; nothing is served until Closed and Initialising, then all is well', async (t) => {
  const { sim, fe } = await setup(t, { order: 1 });
  await fe.connect();
  await fe.writeAndRead(0, 2, 1);
  const Q = fe.queues[0];
  Q.ring.reqProdPvt += Q.ring.entries + 3;
  Q.ring.pushRequests();
  fe.events.notify(Q.port);
  await fe.waitBackend(XenbusState.Closing);
  t.regex((await fe.xs.read(`${fe.be}/error`)) ?? '', /overrun/);
  // Initialised again without going through Closed changes nothing.
  await fe.setState(XenbusState.Initialised);
  await new Promise((r) => setTimeout(r, 200));
  t.is(await fe.backendState(), XenbusState.Closing);
  await fe.setState(XenbusState.Closed);
  await fe.waitBackend(XenbusState.Closed);
  await fe.connect();
  t.is(await fe.xs.read(`${fe.be}/error`), undefined, 'the error node goes at InitWait');
  await fe.writeAndRead(0, 4, 4);
  await holdsPattern(t, sim, 0, 4, 4);
  await fe.disconnect();
});

test.serial('ts: close and reconnect (a guest reboot) with another ring order, ABI and queue count', async (t) => {
  const { sim, fe } = await setup(t, { order: 2 });
  await fe.connect();
  await fe.writeAndRead(0, 8, 2);
  await fe.disconnect();
  fe.options.order = 0;
  fe.options.abi = 32;
  fe.options.queues = 2;
  (fe as { layout: unknown }).layout = LAYOUTS['x86_32-abi'];
  await fe.connect();
  const dst = fe.mem.allocPages(1);
  const r = await fe.send({ kind: 'rw', operation: OP_READ, handle: H, sector: 0n, segments: [fe.segment(dst, false)] }, 1);
  t.is(r.status, RSP_OKAY);
  t.is(firstPatternMismatch(fe.mem.page(dst), 0, 2), -1);
  await holdsPattern(t, sim, 0, 8, 2);
  t.is(sim.backend.active.get(`${DOMID}/${DEVID}`)!.stats().connections, 2);
  await fe.disconnect();
});

test.serial('ts: a read-only vbd says so, offers no discard or barrier, refuses writes and discards, serves reads', async (t) => {
  const { sim, fe } = await setup(t, {}, SPEC, true);
  t.is(Number(await sim.platform.store.read(`${fe.be}/info`)) & 4, 4);
  t.is(await sim.platform.store.read(`${fe.be}/feature-discard`), '0');
  t.is(await sim.platform.store.read(`${fe.be}/feature-barrier`), '0');
  await fe.connect();
  const page = fe.mem.allocPages(2);
  const w = fe.put({ kind: 'rw', operation: OP_WRITE, handle: H, sector: 0n, segments: [fe.segment(page, true)] });
  const d = fe.put({ kind: 'discard', operation: OP_DISCARD, handle: H, sector: 0n, nrSectors: 8n, secure: false });
  const r = fe.put({ kind: 'rw', operation: OP_READ, handle: H, sector: 0n, segments: [fe.segment(page + 1, false)] });
  fe.push();
  t.is((await w).status, RSP_ERROR);
  t.is((await d).status, RSP_EOPNOTSUPP);
  t.is((await r).status, RSP_OKAY);
  await fe.disconnect();
});

test.serial('ts: an order-0 ring named by ring-ref0, and an absent protocol (x86_64-abi), connect (XENSIM.md settled details 9, 11)', async (t) => {
  const { sim, fe } = await setup(t);
  await fe.connect({ override: { 'ring-ref': null, 'ring-ref0': (f) => String(f.queues[0].refs[0]), protocol: null } });
  await fe.writeAndRead(0, 2, 12);
  await holdsPattern(t, sim, 0, 2, 12);
  t.regex(sim.log.join('\n'), /connected: x86_64-abi/);
  await fe.disconnect();
});

// ---- hostile transport keys and guest files (XENSIM.md settled details 5 and 9) ----------

const hostileKeys: Array<[string, FrontendOptions, Record<string, string | null | ((fe: TsFrontend) => string)>, RegExp]> = [
  ['a ring-ref that is not a number', {}, { 'ring-ref': 'twelve' }, /ring-ref/],
  ['a missing ring-ref', {}, { 'ring-ref': null }, /ring-ref/],
  ['a ring-ref outside the grant table', {}, { 'ring-ref': '4000000' }, /grant/],
  ['a ring-ref not granted to domain 0', { order: 0 }, { 'ring-ref': '3' }, /grant/],
  ['a missing event-channel', {}, { 'event-channel': null }, /event-channel/],
  ['event-channel 0', {}, { 'event-channel': '0' }, /event-channel/],
  ['a ring-page-order above the maximum', { order: 1 }, { 'ring-page-order': '5' }, /ring-page-order/],
  ['a ring-page-order without its ring-refN', { order: 1 }, { 'ring-page-order': '2' }, /ring-ref2/],
  ['an unknown protocol', {}, { protocol: 'arm-abi' }, /protocol/],
  ['more queues than offered', { queues: 2 }, { 'multi-queue-num-queues': '9' }, /multi-queue-num-queues/],
  // The first queue is mapped and bound before the second fails: both must be undone.
  ['a second queue whose ring-ref is not granted', { queues: 2 }, { 'queue-1/ring-ref': '3' }, /grant 3/],
  ['two queues on one event channel', { queues: 2 }, { 'queue-1/event-channel': (f: TsFrontend) => String(f.queues[0].port) }, /already bound/],
];

for (const [what, options, override, reason] of hostileKeys) {
  test.serial(`ts hostile keys: ${what} fails that connection (error, Closing); the device recovers`, async (t) => {
    const { sim, fe } = await setup(t, options);
    await fe.connect({ override, expectConnected: false });
    await fe.waitBackend(XenbusState.Closing);
    t.regex((await fe.xs.read(`${fe.be}/error`)) ?? '', reason);
    await fe.setState(XenbusState.Closed);
    await fe.waitBackend(XenbusState.Closed);
    await fe.connect();
    await fe.writeAndRead(0, 2, 3);
    await holdsPattern(t, sim, 0, 2, 3);
    await fe.disconnect();
  });
}

test.serial('ts hostile files: missing guest memory, then a grant table too small for the ring-ref, fail the connection only', async (t) => {
  const { sim, fe } = await setup(t);
  const domDir = path.join(sim.dir, `dom${DOMID}`);
  fs.renameSync(path.join(domDir, 'memory'), path.join(domDir, 'memory.away'));
  await fe.connect({ expectConnected: false });
  await fe.waitBackend(XenbusState.Closing);
  t.regex((await fe.xs.read(`${fe.be}/error`)) ?? '', /memory/);
  fs.renameSync(path.join(domDir, 'memory.away'), path.join(domDir, 'memory'));
  await fe.setState(XenbusState.Closed);
  await fe.waitBackend(XenbusState.Closed);
  // A new, smaller grant table in place of the one this frontend keeps mapped.
  fs.renameSync(path.join(domDir, 'grant-table'), path.join(domDir, 'grant-table.away'));
  fs.writeFileSync(path.join(domDir, 'grant-table'), Buffer.alloc(8 * 8));
  await fe.connect({ expectConnected: false });
  await fe.waitBackend(XenbusState.Closing);
  t.regex((await fe.xs.read(`${fe.be}/error`)) ?? '', /grant/);
  t.true(sim.platform.tree !== undefined, 'the process serves on');
});

test.serial('ts hostile files: memory shrunk while connected gets refused requests, not a crash; grown back, it serves again', async (t) => {
  const { sim, fe } = await setup(t, { memPages: 4096 });
  await fe.connect();
  const memoryFile = path.join(sim.dir, `dom${DOMID}`, 'memory');
  fs.truncateSync(memoryFile, 2048 * PAGE);
  const far = { gref: fe.mem.grant(4000, false), firstSect: 0, lastSect: 7 };
  const refused = await fe.send({ kind: 'rw', operation: OP_READ, handle: H, sector: 0n, segments: [far] });
  t.is(refused.status, RSP_ERROR);
  t.regex(sim.log.join('\n'), /memory file shrank/);
  fs.truncateSync(memoryFile, 4096 * PAGE);
  const served = await fe.send({ kind: 'rw', operation: OP_READ, handle: H, sector: 0n, segments: [far] });
  t.is(served.status, RSP_OKAY);
  await fe.disconnect();
});

test.serial('ts hostile files: memory cut below the ring page while connected fails that connection (error, Closing), not the process; a reconnect serves', async (t) => {
  const { sim, fe } = await setup(t, { memPages: 64 });
  await fe.connect();
  await fe.writeAndRead(0, 2, 3);
  const memoryFile = path.join(sim.dir, `dom${DOMID}`, 'memory');
  const Q = fe.queues[0];
  t.true(Q.ringPage > 0, 'the ring is not on the first page');
  // The ring's page (and every data page) is gone; only the kick is sent (the frontend
  // must not touch its own ring either).
  fs.truncateSync(memoryFile, Q.ringPage * PAGE);
  fe.events.notify(Q.port);
  await fe.waitBackend(XenbusState.Closing);
  t.regex((await fe.xs.read(`${fe.be}/error`)) ?? '', /ring unreachable: .*shrank/);
  fs.truncateSync(memoryFile, 64 * PAGE);
  await fe.setState(XenbusState.Closed);
  await fe.waitBackend(XenbusState.Closed);
  await fe.connect();
  await fe.writeAndRead(0, 4, 5);
  await holdsPattern(t, sim, 0, 4, 5);
  await fe.disconnect();
});

// ---- random request slots on a live ring -------------------------------------------

test.serial('ts fuzz: random request slots on a live ring each get exactly one response with their id and operation; the device serves on', async (t) => {
  const { sim, fe } = await setup(t, { order: 2 });
  await fe.connect();
  const layout = fe.layout;
  // Real grants among the random ones, so that some random requests reach the disk.
  const pages = fe.mem.allocPages(16);
  const goodRefs = Array.from({ length: 16 }, (_, i) => fe.mem.grant(pages + i, i % 2 === 0));
  let id = 1000n;
  await fc.assert(
    fc.asyncProperty(
      fc.array(
        fc.record({
          bytes: fc.uint8Array({ minLength: layout.slotSize, maxLength: layout.slotSize }),
          op: fc.constantFrom(0, 1, 2, 3, 5, 6, 4, 7, 255),
          inner: fc.constantFrom(0, 1, 3, 9),
          count: fc.integer({ min: 0, max: 14 }),
          grefs: fc.array(fc.constantFrom(...goodRefs, 0, 3, 99999), { minLength: 14, maxLength: 14 }),
          sector: fc.oneof(fc.bigInt({ min: 0n, max: BigInt(fe.sectors) }), fc.bigInt({ min: 0n, max: 2n ** 64n - 1n })),
        }),
        { minLength: 1, maxLength: 40 },
      ),
      async (slots) => {
        const answers = slots.map((s) => {
          const slot = Buffer.from(s.bytes);
          slot[0] = s.op;
          slot[1] = s.op === OP_INDIRECT ? s.inner : s.count;
          const myId = id++;
          slot.writeBigUInt64LE(myId, layout.id);
          slot.writeBigUInt64LE(s.sector, layout.sectorNumber);
          if (s.op !== OP_INDIRECT && s.op !== OP_DISCARD) {
            for (let i = 0; i < Math.min(s.count, 11); i++) slot.writeUInt32LE(s.grefs[i], layout.segments + 8 * i);
          } else if (s.op === OP_INDIRECT) {
            slot.writeUInt16LE(s.count, 2);
            for (let i = 0; i < 8; i++) slot.writeUInt32LE(s.grefs[i], layout.indirectGrefs + 4 * i);
          }
          const expectedOp = s.op === OP_INDIRECT ? s.inner : s.op;
          if (fe.queues[0].ring.free === 0) throw new Error('ring full');
          return fe.putRaw(slot, myId).then((r) => ({ r, myId, expectedOp }));
        });
        fe.push();
        for (const { r, myId, expectedOp } of await Promise.all(answers)) {
          if (r.id !== myId || r.operation !== expectedOp) return false;
          if (![RSP_OKAY, RSP_ERROR, RSP_EOPNOTSUPP].includes(r.status)) return false;
        }
        return true;
      },
    ),
    { numRuns: 40 },
  );
  t.is(fe.responses.length, Number(id - 1000n), 'exactly one response per request');
  const byStatus = (status: number) => fe.responses.filter((r) => r.status === status).length;
  t.log(`statuses: ${byStatus(RSP_OKAY)} okay, ${byStatus(RSP_ERROR)} error, ${byStatus(RSP_EOPNOTSUPP)} not supported`);
  t.true(byStatus(RSP_OKAY) > 0 && byStatus(RSP_ERROR) > 0 && byStatus(RSP_EOPNOTSUPP) > 0, 'the random slots reach every outcome');
  t.is(await fe.backendState(), XenbusState.Connected);
  await fe.writeAndRead(0, 4, 8);
  await holdsPattern(t, sim, 0, 4, 8);
  await fe.disconnect();
});

// ---- one hostile device beside a well-behaved one --------------------------------

test.serial('ts isolation: a frontend that overruns its ring and lies about grants does not disturb another device', async (t) => {
  const sim = await SimBackend.start();
  t.teardown(() => sim.close());
  await sim.attach(DOMID, DEVID, 'memory:32M');
  await sim.attach(DOMID + 1, DEVID, 'memory:16M');
  await sim.waitForDevice(DOMID, DEVID);
  await sim.waitForDevice(DOMID + 1, DEVID);
  const good = await TsFrontend.open(sim.dir, DOMID, DEVID);
  t.teardown(() => good.close());
  const bad = await TsFrontend.open(sim.dir, DOMID + 1, DEVID);
  t.teardown(() => bad.close());
  await good.connect();
  await bad.connect();
  const steady = (async () => {
    for (let i = 0; i < 20; i++) await good.writeAndRead(i * 64, 8, 40 + i);
  })();
  const refused = await bad.send({ kind: 'rw', operation: OP_READ, handle: H, sector: 0n, segments: [{ gref: 12345, firstSect: 0, lastSect: 7 }] });
  t.is(refused.status, RSP_ERROR);
  const Q = bad.queues[0];
  Q.ring.reqProdPvt += Q.ring.entries * 7;
  Q.ring.pushRequests();
  bad.events.notify(Q.port);
  await bad.waitBackend(XenbusState.Closing);
  await steady;
  t.is(await good.backendState(), XenbusState.Connected);
  for (let i = 0; i < 20; i++) {
    const data = await readProvider(sim.providers.get('memory:32M')!, i * 64 * 512, 8 * 4096);
    t.is(firstMismatch(data, i * 64 * 512, 40 + i), -1);
  }
  await good.disconnect();
});

test.serial('ts: a vbd whose params cannot be opened gets an error node and Closing; a vbd beside it serves', async (t) => {
  const sim = await SimBackend.start();
  t.teardown(() => sim.close());
  await sim.attach(DOMID, DEVID, 'raw:/nonexistent/disk.img');
  await sim.attach(DOMID, DEVID + 16, SPEC);
  await sim.waitForDevice(DOMID, DEVID + 16);
  const be = `/local/domain/0/backend/vbd/${DOMID}/${DEVID}`;
  for (const deadline = Date.now() + 30_000; (await sim.platform.store.read(`${be}/state`)) !== '5' && Date.now() < deadline; ) await new Promise((r) => setTimeout(r, 25));
  t.is(await sim.platform.store.read(`${be}/state`), '5');
  t.regex((await sim.platform.store.read(`${be}/error`)) ?? '', /cannot open 'raw:\/nonexistent\/disk.img'/);
  const fe = await TsFrontend.open(sim.dir, DOMID, DEVID + 16);
  t.teardown(() => fe.close());
  await fe.connect();
  await fe.writeAndRead(0, 2, 5);
  await fe.disconnect();
});

// ---- hot-unplug ------------------------------------------------------------------

test.serial('ts: hot-unplug (online=0) asks a connected frontend to close; the device ends and detach removes the nodes', async (t) => {
  const { sim, fe } = await setup(t);
  await fe.connect();
  await fe.writeAndRead(0, 2, 1);
  const client = await XsClient.connect(path.join(sim.dir, 'xenstored.sock'));
  t.teardown(() => client.close());
  const detached = detach(client, DOMID, DEVID, 60_000);
  await fe.waitBackend(XenbusState.Closing);
  await fe.setState(XenbusState.Closed);
  t.true(await detached, 'the backend reached Closed');
  t.is(await client.read(fe.be + '/state'), undefined);
  t.is(await client.read(fe.fe + '/state'), undefined);
  await untilNoDevice(sim);
  t.is(sim.backend.active.size, 0);
  // The same vbd may be attached again and serves.
  await sim.attach(DOMID, DEVID, 'memory:8M');
  await sim.waitForDevice(DOMID, DEVID);
  await fe.connect();
  await fe.writeAndRead(0, 2, 2);
  await fe.disconnect();
});

test.serial('ts: hot-unplug with a frontend that never closes: the backend gives up after its timeout, writes Closed and frees the device', async (t) => {
  const { sim, fe } = await setup(t, {}, SPEC, false, { unplugTimeoutMs: 300 });
  await fe.connect();
  await fe.writeAndRead(0, 2, 1);
  await fe.xs.write(`${fe.be}/online`, '0');
  await fe.waitBackend(XenbusState.Closing);
  // The frontend stays Connected and never answers.
  await fe.waitBackend(XenbusState.Closed);
  await untilNoDevice(sim);
  t.is(sim.backend.active.size, 0, 'the device ended');
  t.regex(sim.log.join('\n'), /did not close within 300 ms/);
  t.regex(sim.log.join('\n'), /ended/);
  // Its ring is no longer served: a request gets no answer.
  const late = fe.send({ kind: 'rw', operation: OP_READ, handle: H, sector: 0n, segments: [fe.segment(fe.mem.allocPages(1), false)] });
  late.catch(() => undefined);
  t.is(await Promise.race([late.then(() => 'answered'), new Promise((r) => setTimeout(() => r('silent'), 500))]), 'silent');
  // The toolstack's detach finds it Closed and removes the nodes.
  const client = await XsClient.connect(path.join(sim.dir, 'xenstored.sock'));
  t.teardown(() => client.close());
  t.true(await detach(client, DOMID, DEVID, 10_000));
  t.is(await client.read(`${fe.be}/state`), undefined);
});

test.serial('ts: detach with a frontend that never closes gives up after its own timeout, removes the nodes, and the device ends', async (t) => {
  const { sim, fe } = await setup(t);
  await fe.connect();
  await fe.writeAndRead(0, 2, 1);
  const client = await XsClient.connect(path.join(sim.dir, 'xenstored.sock'));
  t.teardown(() => client.close());
  t.false(await detach(client, DOMID, DEVID, 300), 'the backend could not reach Closed');
  t.is(await client.read(`${fe.be}/state`), undefined);
  t.is(await client.read(`${fe.fe}/state`), undefined);
  await untilNoDevice(sim);
  t.is(sim.backend.active.size, 0, 'the device ended with its nodes');
  t.regex(sim.log.join('\n'), /ended/);
});

// ---- XenStore conflicts ---------------------------------------------------------------

/**
 * The platform's XenStore with a real conflict made before every other commit: a path
 * the transaction touched is rewritten (same value) outside it, so the sim store answers
 * EAGAIN and commits nothing.
 */
class ConflictingStore implements XenStore {
  private readonly touched = new Map<TxId, Set<string>>();
  private commits = 0;
  conflictsMade = 0;
  conflictsSeen = 0;

  constructor(private readonly inner: XenStore) {}

  private touch(path: string, tx?: TxId): void {
    if (tx) this.touched.get(tx)?.add(path);
  }
  read(path: string, tx?: TxId) {
    this.touch(path, tx);
    return this.inner.read(path, tx);
  }
  write(path: string, value: string, tx?: TxId) {
    this.touch(path, tx);
    return this.inner.write(path, value, tx);
  }
  directory(path: string, tx?: TxId) {
    this.touch(path, tx);
    return this.inner.directory(path, tx);
  }
  rm(path: string, tx?: TxId) {
    this.touch(path, tx);
    return this.inner.rm(path, tx);
  }
  watch(path: string, onChange: (path: string) => void) {
    return this.inner.watch(path, onChange);
  }
  async transactionStart() {
    const tx = await this.inner.transactionStart();
    this.touched.set(tx, new Set());
    return tx;
  }
  async transactionEnd(tx: TxId, commit: boolean) {
    const paths = this.touched.get(tx) ?? new Set<string>();
    this.touched.delete(tx);
    let made = false;
    if (commit && this.commits++ % 2 === 0) {
      for (const p of paths) {
        const value = await this.inner.read(p);
        if (value === undefined) continue;
        await this.inner.write(p, value);
        made = true;
        this.conflictsMade++;
        break;
      }
    }
    const ok = await this.inner.transactionEnd(tx, commit);
    if (made && !ok) this.conflictsSeen++;
    return ok;
  }
}

test.serial('ts: every other commit of the device meets a real conflict (EAGAIN); its transactions are retried and it serves', async (t) => {
  let store: ConflictingStore | undefined;
  const { sim, fe } = await setup(t, {}, SPEC, false, { store: (platform) => (store = new ConflictingStore(platform.store)) });
  await fe.connect();
  await fe.writeAndRead(0, 8, 6);
  await holdsPattern(t, sim, 0, 8, 6);
  await fe.disconnect();
  t.true(store!.conflictsMade >= 3, `conflicts made: ${store!.conflictsMade}`);
  t.is(store!.conflictsSeen, store!.conflictsMade, 'every conflict made was answered EAGAIN');
  t.is(await fe.backendState(), XenbusState.Closed);
  t.is(await fe.xs.read(`${fe.be}/sectors`), String(64 * 2048), 'the retried publication is complete');
});
