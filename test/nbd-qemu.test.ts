/**
 * The NBD export against qemu: qemu-img info/convert/compare and qemu-io pattern I/O at
 * unaligned offsets, over a Unix socket and over loopback TCP.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { TRANSPORTS, listenArgs, serve } from './helpers/nbd';
import { must, run } from './helpers/run';
import { tempDir } from './helpers/temp';

for (const transport of TRANSPORTS) {
  test(`qemu-img info, convert in and out, compare (${transport})`, async (t) => {
    const dir = tempDir(t);
    const source = path.join(dir, 'source.raw');
    // 16 MiB: random data with a zero gap in the middle.
    await must('dd', ['if=/dev/urandom', `of=${source}`, 'bs=1M', 'count=16', 'status=none']);
    await must('dd', ['if=/dev/zero', `of=${source}`, 'bs=1M', 'seek=6', 'count=3', 'conv=notrunc', 'status=none']);
    const server = await serve(t, [...listenArgs(t, transport), 'memory:16M']);
    t.regex(server.uri, transport === 'unix' ? /^nbd\+unix:\/\/\/\?socket=/ : /^nbd:\/\/127\.0\.0\.1:\d+\/$/);

    const info = await must('qemu-img', ['info', '--output=json', server.uri]);
    t.is(JSON.parse(info)['virtual-size'], 16 * 1024 * 1024);

    await must('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', source, server.uri], { timeoutMs: 120_000 });
    await must('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', source, server.uri]);

    const back = path.join(dir, 'back.raw');
    await must('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', server.uri, back], { timeoutMs: 120_000 });
    t.true(fs.readFileSync(back).equals(fs.readFileSync(source)));

    // A difference is seen: change one byte through the export.
    await must('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 12345 1', server.uri]);
    const differ = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', source, server.uri]);
    t.is(differ.code, 1, differ.stdout + differ.stderr);
    t.is(await server.stop(), 0);
  });

  test(`qemu-io pattern writes and reads at unaligned offsets (${transport})`, async (t) => {
    const server = await serve(t, [...listenArgs(t, transport), 'memory:8M']);
    const commands = [
      'write -P 0xab 4097 3',
      'write -P 0xcd 65535 131074',
      'aio_write -P 0x11 1000001 70001',
      'aio_write -P 0x22 3000003 511',
      'aio_flush',
      'write -P 0xee 8388607 1',
      'read -P 0xab 4097 3',
      'read -P 0 4094 3',
      'read -P 0 4100 100',
      'read -P 0xcd 65535 131074',
      'aio_read -P 0x11 1000001 70001',
      'aio_read -P 0x22 3000003 511',
      'aio_flush',
      'read -P 0 1000000 1',
      'read -P 0 1070002 10',
      'read -P 0xee 8388607 1',
    ];
    const out = await must('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), server.uri]);
    t.notRegex(out, /Pattern verification failed|error|failed/i, out);
    t.is((out.match(/^read \d+\/\d+ bytes/gm) ?? []).length, 9, out);

    // Past the end: qemu refuses or the server answers with an error; nothing is written.
    const past = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 8388607 2', server.uri]);
    t.regex(past.stdout + past.stderr, /error|Input\/output|Invalid|No space|out of range/i);
    t.is(await server.stop(), 0);
  });
}
