/**
 * Grant copy without Xen: the segment table tapkit hands to xengnttab_grant_copy against
 * the layout of Xen's own header (a C program compiled here against libxen-dev's
 * xengnttab.h prints offsetof/sizeof and the bytes of filled-in segments); the copying
 * mapper's moves (only each segment's sectors, never a whole page; nothing back after a
 * failed READ; fallback to mapping when the copy call itself fails); and the whole path
 * on the sim platform (`xen serve --grant-access copy`) under the C frontend, refused
 * grants included. On a real dom0 the lab exercises it (docs/xen-lab.md).
 */
import test from 'ava';
import { execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { PAGE } from '../core/ring/abi';
import { CopyingGrantMapper, CopyUnavailable, type CopyPiece } from '../core/ring/grant-copy';
import type { GrantMapper, PageMapping } from '../core/ring/platform';
import { GrantError } from '../core/ring/platform';
import { COPY_LAYOUT, encodeCopySegments, GNTCOPY_dest_gref, GNTCOPY_source_gref, GRANT_COPY_SEGMENT_SIZE } from '../native/xengnttab';
import { CLI } from './helpers/daemon';
import { runFrontend } from './xen/harness';
import { fileTempDir } from './helpers/temp';

const run = promisify(execFile);

const LAYOUT_PROGRAM = `
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <xengnttab.h>
typedef xengnttab_grant_copy_segment_t seg_t;
static void dump(const seg_t *s) {
  const unsigned char *b = (const unsigned char *)s;
  for (size_t i = 0; i < sizeof *s; i++) printf("%02x", b[i]);
  printf("\\n");
}
int main(void) {
  printf("size %zu\\n", sizeof(seg_t));
  printf("source %zu\\ndest %zu\\n", offsetof(seg_t, source), offsetof(seg_t, dest));
  printf("foreignRef %zu\\nforeignOffset %zu\\nforeignDomid %zu\\n", offsetof(seg_t, source.foreign.ref), offsetof(seg_t, source.foreign.offset), offsetof(seg_t, source.foreign.domid));
  printf("len %zu\\nflags %zu\\nstatus %zu\\n", offsetof(seg_t, len), offsetof(seg_t, flags), offsetof(seg_t, status));
  printf("source_gref %d\\ndest_gref %d\\n", GNTCOPY_source_gref, GNTCOPY_dest_gref);
  seg_t in, out;
  memset(&in, 0, sizeof in); memset(&out, 0, sizeof out);
  /* From grant 0x12345678 at offset 512 of domain 7 into local memory at 0x7f1122334455. */
  in.source.foreign.ref = 0x12345678; in.source.foreign.offset = 512; in.source.foreign.domid = 7;
  in.dest.virt = (void *)0x7f1122334455ULL; in.len = 1024; in.flags = GNTCOPY_source_gref;
  /* From local memory to grant 9 at offset 3584 of domain 7. */
  out.source.virt = (void *)0x7f1122334455ULL;
  out.dest.foreign.ref = 9; out.dest.foreign.offset = 3584; out.dest.foreign.domid = 7;
  out.len = 512; out.flags = GNTCOPY_dest_gref;
  dump(&in); dump(&out);
  return 0;
}
`;

test('the grant copy segment table matches xengnttab.h (layout and encoded bytes)', async (t) => {
  const dir = fileTempDir('tapkit-gntcopy-');
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.writeFileSync(path.join(dir, 'layout.c'), LAYOUT_PROGRAM);
  await run('gcc', ['-Wall', '-Werror', '-o', path.join(dir, 'layout'), path.join(dir, 'layout.c')], { timeout: 60_000 });
  const { stdout } = await run(path.join(dir, 'layout'), [], { timeout: 10_000 });
  const lines = stdout.trim().split('\n');
  const values = Object.fromEntries(lines.filter((l) => l.includes(' ')).map((l) => l.split(' ')).map(([k, v]) => [k, Number(v)]));
  t.is(values.size, GRANT_COPY_SEGMENT_SIZE);
  for (const key of ['source', 'dest', 'foreignRef', 'foreignOffset', 'foreignDomid', 'len', 'flags', 'status'] as const) t.is(values[key], COPY_LAYOUT[key], key);
  t.is(values.source_gref, GNTCOPY_source_gref);
  t.is(values.dest_gref, GNTCOPY_dest_gref);

  const local = Buffer.alloc(1024);
  const table = encodeCopySegments(
    7,
    [
      { local, ref: 0x12345678, offset: 512, direction: 'in' },
      { local: local.subarray(0, 512), ref: 9, offset: 3584, direction: 'out' },
    ],
    () => 0x7f1122334455,
  );
  const [cIn, cOut] = lines.filter((l) => /^[0-9a-f]+$/.test(l));
  t.is(table.subarray(0, 24).toString('hex'), cIn);
  t.is(table.subarray(24, 48).toString('hex'), cOut);
  t.throws(() => encodeCopySegments(7, [{ local: Buffer.alloc(1024), ref: 1, offset: 3584, direction: 'in' }], () => 0), { message: /crosses a page/ });
});

/** A guest of `pages` pages whose grant r is page r (a stand-in for a domain, to test the mapper's logic). */
class PagesGuest implements GrantMapper {
  readonly memory: Buffer;
  maps = 0;
  constructor(pages: number) {
    this.memory = Buffer.alloc(pages * PAGE, 0xee);
  }
  mapRing(): never {
    throw new Error('not used');
  }
  mapPages(refs: number[]): PageMapping {
    this.maps++;
    return { pages: refs.map((r) => this.memory.subarray(r * PAGE, (r + 1) * PAGE)), release() {} };
  }
  close(): void {}
  copy(_domid: number, pieces: CopyPiece[]): number[] {
    return pieces.map((p) => {
      if (p.ref * PAGE >= this.memory.length) return -4; // GNTST_bad_gntref
      const at = p.ref * PAGE + p.offset;
      if (p.direction === 'in') p.local.set(this.memory.subarray(at, at + p.local.length));
      else p.local.copy(this.memory, at);
      return 0;
    });
  }
}

test('the copying mapper moves only the segments\' sectors, skips failed READs, refuses bad grants and falls back to mapping', (t) => {
  const guest = new PagesGuest(4);
  const log: string[] = [];
  let broken = false;
  const copier = {
    copy: (d: number, pieces: CopyPiece[]) => {
      if (broken) throw new CopyUnavailable('xengnttab_grant_copy: ENOSYS');
      return guest.copy(d, pieces);
    },
  };
  const mapper = new CopyingGrantMapper(guest, copier, 3, (m) => log.push(m));
  t.is(mapper.access, 'grant copy');

  // WRITE: sectors 2..3 of page 1 come in; the bounce page holds them at the same offset.
  guest.memory.fill(0x41, PAGE + 1024, PAGE + 2048);
  const write = mapper.mapPages([1], false, [{ firstSect: 2, lastSect: 3 }]);
  t.true(write.pages[0].subarray(1024, 2048).every((b) => b === 0x41));
  write.release(true);

  // READ: only sectors 1..2 of page 2 go out; the rest of the guest's page is untouched.
  const read = mapper.mapPages([2], true, [{ firstSect: 1, lastSect: 2 }]);
  read.pages[0].fill(0x52);
  read.release(true);
  t.true(guest.memory.subarray(2 * PAGE + 512, 2 * PAGE + 1536).every((b) => b === 0x52));
  t.true(guest.memory.subarray(2 * PAGE, 2 * PAGE + 512).every((b) => b === 0xee));
  t.true(guest.memory.subarray(2 * PAGE + 1536, 3 * PAGE).every((b) => b === 0xee));

  // A READ whose I/O failed writes nothing back.
  const failed = mapper.mapPages([3], true);
  failed.pages[0].fill(0x46);
  failed.release(false);
  t.true(guest.memory.subarray(3 * PAGE, 4 * PAGE).every((b) => b === 0xee));

  // A grant the hypervisor refuses fails the request (GrantError: BLKIF_RSP_ERROR).
  t.throws(() => mapper.mapPages([9], false), { instanceOf: GrantError, message: /grant 9 .* refused .*status -4/ });
  t.throws(() => mapper.mapPages([0], false, [{ firstSect: 7, lastSect: 8 }]), { instanceOf: GrantError });
  t.is(guest.maps, 0, 'nothing mapped while copy works');

  // The copy call fails as a whole: a READ in flight still reaches the guest, by mapping.
  const inFlight = mapper.mapPages([0], true, [{ firstSect: 0, lastSect: 0 }]);
  inFlight.pages[0].fill(0x4d, 0, 512);
  broken = true;
  inFlight.release(true);
  t.true(guest.memory.subarray(0, 512).every((b) => b === 0x4d));
  t.regex(mapper.access, /^grant map \(grant copy failed: xengnttab_grant_copy: ENOSYS\)$/);
  t.is(log.length, 1);
  const mapped = mapper.mapPages([1], false);
  t.is(mapped.pages[0].buffer, guest.memory.buffer, 'from now on the pages are mapped');
});

test('the copying mapper reuses a released bounce buffer, never one in use, and keeps none after a refused copy', (t) => {
  const guest = new PagesGuest(4);
  const mapper = new CopyingGrantMapper(guest, { copy: (d, pieces) => guest.copy(d, pieces) }, 3);
  const a = mapper.mapPages([0, 1], true);
  const b = mapper.mapPages([2, 3], true);
  t.not(a.pages[0].buffer, b.pages[0].buffer, 'two requests in flight: two buffers');
  a.pages[0].fill(0x61);
  a.release(true);
  const c = mapper.mapPages([1, 0], false);
  t.is(c.pages[0].buffer, a.pages[0].buffer, 'the released buffer of the same size is reused');
  t.not(c.pages[0].buffer, b.pages[0].buffer);
  // Released twice (idempotent): handed out once only.
  c.release();
  c.release();
  const d = mapper.mapPages([0, 1], true);
  const e = mapper.mapPages([2, 3], true);
  t.not(d.pages[0].buffer, e.pages[0].buffer);
  // A refused copy-in: the request fails, its buffer goes back and is handed out again.
  const before = d.pages[0].buffer;
  d.release(false);
  t.throws(() => mapper.mapPages([9, 0], false), { instanceOf: GrantError });
  const f = mapper.mapPages([0, 1], false);
  t.is(f.pages[0].buffer, before);
  t.deepEqual([...f.pages[0].subarray(0, 4)], [0x61, 0x61, 0x61, 0x61], 'and holds the data copied in for its own request');
});

test.serial('xen serve --grant-access copy on the sim: the C frontend reads and writes, indirect and refused grants', async (t) => {
  const dir = fileTempDir('tapkit-xen-copy-');
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const child = spawn(process.execPath, [CLI, 'xen', 'serve', '--platform', `sim:${dir}`, '--grant-access', 'copy'], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => child.kill('SIGKILL'));
  let output = '';
  child.stdout.on('data', (d) => (output += d));
  child.stderr.on('data', (d) => (output += d));
  const deadline = Date.now() + 60_000;
  while (!output.includes('serving') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  t.true(output.includes('serving'), output);
  const scenarios: Array<[number, string[]]> = [
    [5, ['rw', '--seed', '5']],
    [6, ['indirect', '--seed', '6']],
    [7, ['hostile']],
    [8, ['queues', '--queues', '2', '--abi', '32', '--persistent', '--seed', '8']],
  ];
  for (const [domid, args] of scenarios) {
    await run(process.execPath, [CLI, 'xen', 'attach', '--platform', `sim:${dir}`, '--domid', String(domid), '--devid', '51712', 'memory:64M'], { timeout: 30_000 });
    const result = await runFrontend(dir, domid, 51712, args);
    t.is(result.code, 0, `${args.join(' ')}: ${result.stdout}${result.stderr}\n${output}`);
  }
  t.regex(output, /connected: x86_64-abi, 1 queue\(s\), ring order \d+.*, data by grant copy/);
  t.notRegex(output, /grant map/);
});
