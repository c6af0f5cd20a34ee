/**
 * The NBD export against libnbd's tools: nbdinfo (flags, block sizes, LIST with
 * descriptions, --map) and nbdcopy in both directions, over a Unix socket and loopback TCP.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { TRANSPORTS, listenArgs, serve } from './helpers/nbd';
import { must } from './helpers/run';
import { tempDir } from './helpers/temp';

const MiB = 1024 * 1024;

for (const transport of TRANSPORTS) {
  test(`nbdinfo --json and --list: flags, block sizes, exports with descriptions (${transport})`, async (t) => {
    const dir = tempDir(t);
    const file = path.join(dir, 'disk.raw');
    await must('truncate', ['-s', '3M', file]);
    const server = await serve(t, [...listenArgs(t, transport), 'scratch=memory:8M', `disk=raw:${file}`, 'memory,limit=1M:2M']);
    t.is(server.uris.length, 3);
    const byName = (name: string) => server.uris.find((u) => (transport === 'unix' ? u.includes(`:///${name}?`) : u.endsWith(`/${name}`)))!;

    const listed = JSON.parse(await must('nbdinfo', ['--list', '--json', byName('scratch')]));
    t.is(listed.protocol, 'newstyle-fixed');
    t.true(listed.structured);
    const names = listed.exports.map((e: { 'export-name': string }) => e['export-name']).sort();
    t.deepEqual(names, ['', 'disk', 'scratch']);
    const scratch = listed.exports.find((e: { 'export-name': string }) => e['export-name'] === 'scratch');
    t.is(scratch.description, 'memory:8M');
    t.is(scratch['export-size'], 8 * MiB);
    t.like(scratch, {
      is_read_only: false, can_flush: true, can_fua: true, can_trim: true, can_zero: true, can_fast_zero: true,
      can_cache: true, can_df: true, can_multi_conn: true, block_size_minimum: 1, block_size_preferred: 4096,
      block_size_maximum: 32 * MiB,
    });
    t.deepEqual(scratch.contexts, ['base:allocation']);
    const disk = listed.exports.find((e: { 'export-name': string }) => e['export-name'] === 'disk');
    t.is(disk.description, `raw:${file}`);
    t.is(disk['export-size'], 3 * MiB);

    const single = JSON.parse(await must('nbdinfo', ['--json', byName('')]));
    t.is(single.exports[0]['export-name'], '');
    t.is(single.exports[0]['export-size'], 2 * MiB);
    t.is(await server.stop(), 0);
  });

  test(`nbdinfo on a read-only export with a custom maximum request (${transport})`, async (t) => {
    const server = await serve(t, [...listenArgs(t, transport), '--read-only', '--max-request', '1M', 'memory:4M']);
    const info = JSON.parse(await must('nbdinfo', ['--json', server.uri])).exports[0];
    t.like(info, { is_read_only: true, can_trim: false, can_zero: false, can_fast_zero: false, can_fua: false, block_size_maximum: MiB });
    t.is(await server.stop(), 0);
  });

  test(`nbdinfo --map shows the holes of a memory disk as written (${transport})`, async (t) => {
    const server = await serve(t, [...listenArgs(t, transport), 'memory:8M']);
    await must('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 64k', '-c', 'write -P 2 1M 4k', '-c', 'write -P 3 5M 1M', server.uri]);
    const map = JSON.parse(await must('nbdinfo', ['--map', '--json', server.uri]));
    // The memory disk allocates 64 KiB chunks: a 4 KiB write maps a whole chunk.
    t.deepEqual(
      map.map((e: { offset: number; length: number; type: number }) => [e.offset, e.length, e.type]),
      [
        [0, 64 * 1024, 0],
        [64 * 1024, MiB - 64 * 1024, 3],
        [MiB, 64 * 1024, 0],
        [MiB + 64 * 1024, 4 * MiB - 64 * 1024, 3],
        [5 * MiB, MiB, 0],
        [6 * MiB, 2 * MiB, 3],
      ],
    );
    // Zeroing with holes allowed gives the memory back; the map follows.
    await must('qemu-io', ['-f', 'raw', '-c', 'write -z -u 5M 1M', server.uri]);
    const after = JSON.parse(await must('nbdinfo', ['--map', '--json', server.uri]));
    t.deepEqual(after[after.length - 1], { offset: MiB + 64 * 1024, length: 7 * MiB - 64 * 1024, type: 3, description: 'hole,zero' });
    t.is(await server.stop(), 0);
  });

  test(`nbdcopy into the export and back out, with --flush (${transport})`, async (t) => {
    const dir = tempDir(t);
    const source = path.join(dir, 'source.raw');
    await must('truncate', ['-s', '40M', source]);
    await must('dd', ['if=/dev/urandom', `of=${source}`, 'bs=1M', 'count=5', 'seek=3', 'conv=notrunc', 'status=none']);
    await must('dd', ['if=/dev/urandom', `of=${source}`, 'bs=1M', 'count=9', 'seek=30', 'conv=notrunc', 'status=none']);
    const server = await serve(t, [...listenArgs(t, transport), 'memory:40M']);
    await must('nbdcopy', ['--flush', source, server.uri], { timeoutMs: 120_000 });
    const back = path.join(dir, 'back.raw');
    await must('truncate', ['-s', '40M', back]);
    await must('nbdcopy', ['--flush', server.uri, back], { timeoutMs: 120_000 });
    t.true(fs.readFileSync(back).equals(fs.readFileSync(source)));
    // nbdcopy skipped the holes: the export allocated only the data.
    const map = JSON.parse(await must('nbdinfo', ['--map', '--json', server.uri]));
    const data = map.filter((e: { type: number }) => e.type === 0).reduce((n: number, e: { length: number }) => n + e.length, 0);
    t.is(data, 14 * MiB);
    t.is(await server.stop(), 0);
  });
}
