/**
 * Persistent grants kept mapped (core/ring/persistent-grants.ts), over a stand-in guest
 * whose grant r is page r: each grant mapped once for the connection, data moved by memcpy
 * (only each segment's sectors out to the guest), the per-request way when the grants
 * cannot be kept (limit, refused mapping), everything released at close. On Xen the lab's
 * direct ring uses it (Linux blkfront negotiates persistent grants).
 */
import test from 'ava';
import { PAGE } from '../core/ring/abi';
import { PersistentGrantMapper } from '../core/ring/persistent-grants';
import { GrantError, type GrantMapper, type PageMapping } from '../core/ring/platform';

class Guest implements GrantMapper {
  readonly memory: Buffer;
  maps = 0;
  live = 0;
  /** Grants the guest gave read-only: a writable mapping is refused. */
  readonly readOnly = new Set<number>();
  constructor(pages: number) {
    this.memory = Buffer.alloc(pages * PAGE, 0xee);
  }
  mapRing(): never {
    throw new Error('not used');
  }
  mapPages(refs: number[], writable: boolean): PageMapping {
    for (const r of refs) if (r * PAGE >= this.memory.length || (writable && this.readOnly.has(r))) throw new GrantError(`grant ${r} refused`);
    this.maps++;
    this.live++;
    let released = false;
    return {
      pages: refs.map((r) => this.memory.subarray(r * PAGE, (r + 1) * PAGE)),
      release: () => {
        if (!released) this.live--;
        released = true;
      },
    };
  }
  close(): void {}
}

/** The per-request way, recording what it was asked. */
class PerRequest implements GrantMapper {
  readonly asked: number[][] = [];
  closed = false;
  readonly access = 'grant copy';
  mapRing(): never {
    throw new Error('not used');
  }
  mapPages(refs: number[]): PageMapping {
    this.asked.push(refs);
    return { pages: refs.map(() => Buffer.alloc(PAGE)), release() {} };
  }
  close(): void {
    this.closed = true;
  }
}

test('each grant is mapped once for the connection; data moves by memcpy, only the segments\' sectors out', (t) => {
  const guest = new Guest(8);
  const perRequest = new PerRequest();
  const mapper = new PersistentGrantMapper(guest, perRequest);
  t.regex(mapper.access, /persistent grants kept mapped \(else grant copy\)/);

  // WRITE: the guest's sectors 2..3 of page 1 reach the VBD's buffer.
  guest.memory.fill(0x57, PAGE + 1024, PAGE + 2048);
  const write = mapper.mapPages([1, 2], false, [{ firstSect: 2, lastSect: 3 }, { firstSect: 0, lastSect: 7 }]);
  t.true(write.pages[0].subarray(1024, 2048).every((b) => b === 0x57));
  t.is(write.pages[0].buffer, write.pages[1].buffer, 'one buffer: the request stays one I/O');
  t.is(write.pages[1].byteOffset, write.pages[0].byteOffset + PAGE);
  write.release(true);
  t.is(guest.maps, 1);

  // READ on the same grants: no new mapping; only sectors 1..2 of page 2 change in the guest.
  const read = mapper.mapPages([2], true, [{ firstSect: 1, lastSect: 2 }]);
  read.pages[0].fill(0x52);
  t.true(guest.memory.subarray(2 * PAGE, 3 * PAGE).every((b) => b === 0xee), 'nothing reaches the guest before release');
  read.release(true);
  t.true(guest.memory.subarray(2 * PAGE + 512, 2 * PAGE + 1536).every((b) => b === 0x52));
  t.true(guest.memory.subarray(2 * PAGE, 2 * PAGE + 512).every((b) => b === 0xee));
  t.true(guest.memory.subarray(2 * PAGE + 1536, 3 * PAGE).every((b) => b === 0xee));
  t.is(guest.maps, 1, 'grants 1 and 2 were kept');
  t.is(mapper.keptPages, 2);

  // A READ that failed writes nothing; a second release does nothing.
  const failed = mapper.mapPages([3], true);
  failed.pages[0].fill(0x46);
  failed.release(false);
  failed.release(true);
  t.true(guest.memory.subarray(3 * PAGE, 4 * PAGE).every((b) => b === 0xee));

  // The same page twice in one request (two segments of one page): mapped once.
  const twice = mapper.mapPages([4, 4], false, [{ firstSect: 0, lastSect: 0 }, { firstSect: 1, lastSect: 1 }]);
  twice.release();
  t.is(mapper.keptPages, 4);
  t.deepEqual(perRequest.asked, []);

  mapper.close();
  t.is(guest.live, 0, 'every kept mapping released at close');
  t.true(perRequest.closed);
  t.throws(() => mapper.mapPages([1], false), { instanceOf: GrantError });
});

test('grants that cannot be kept go the per-request way: over the limit, a refused mapping, a bad span', (t) => {
  const guest = new Guest(8);
  const perRequest = new PerRequest();
  const mapper = new PersistentGrantMapper(guest, perRequest, 3);
  mapper.mapPages([0, 1], false).release();
  // Two more would pass the limit of 3: this request goes per request, nothing more is kept.
  mapper.mapPages([2, 3], true).release(true);
  t.deepEqual(perRequest.asked, [[2, 3]]);
  t.is(mapper.keptPages, 2);
  // One more fits.
  mapper.mapPages([2], false).release();
  t.is(mapper.keptPages, 3);
  // Kept grants are still served without mapping.
  mapper.mapPages([0, 2], true).release(true);
  t.is(guest.maps, 2);

  // A grant the guest gave read-only (a frontend without persistent grants would): refused as writable, served per request.
  const other = new PersistentGrantMapper(guest, perRequest);
  guest.readOnly.add(5);
  other.mapPages([5, 6], false).release();
  t.deepEqual(perRequest.asked.at(-1), [5, 6]);
  t.is(other.keptPages, 0, 'all or nothing');
  // A grant outside the guest: per request too (which then refuses it).
  other.mapPages([99], false).release();
  t.deepEqual(perRequest.asked.at(-1), [99]);
  // A segment outside its page is refused.
  t.throws(() => other.mapPages([6], true, [{ firstSect: 7, lastSect: 8 }]), { instanceOf: GrantError });
  other.close();
  mapper.close();
  t.is(guest.live, 0);
});
