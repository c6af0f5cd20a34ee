/**
 * fio's nbd engine (libnbd, the benchmark's client) as an interop peer: random writes of
 * mixed sizes at queue depth 16 with checksummed blocks, read back and verified by fio
 * itself, over a Unix socket and loopback TCP; then the same bytes checked through
 * another client (qemu-img compare against the file behind the export).
 */
import test from 'ava';
import * as path from 'node:path';
import { TRANSPORTS, listenArgs, serve } from './helpers/nbd';
import { must } from './helpers/run';
import { tempDir } from './helpers/temp';

for (const transport of TRANSPORTS) {
  test(`fio nbd engine: verified random writes at QD16 (${transport})`, async (t) => {
    const dir = tempDir(t);
    const image = path.join(dir, 'disk.raw');
    await must('truncate', ['-s', '32M', image]);
    const server = await serve(t, [...listenArgs(t, transport), `raw:${image}`]);
    const common = [
      '--ioengine=nbd', `--uri=${server.uri}`, '--size=32M', '--bsrange=4k-256k', '--iodepth=16', '--thread',
      '--verify=crc32c', '--verify_fatal=1', '--verify_state_save=0', '--randseed=7', '--output-format=json',
    ];
    const out = await must('fio', ['--name=write-verify', '--rw=randwrite', '--do_verify=1', ...common], { timeoutMs: 120_000 });
    const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
    t.is(job.error, 0);
    t.is(job.write.io_bytes, 32 * 1024 * 1024);
    t.true(job.read.io_bytes > 0, 'fio read its writes back to verify them');

    // A second run only verifies (a fresh connection reading what the first one wrote).
    const again = await must('fio', ['--name=verify-only', '--rw=randwrite', '--verify_only', ...common], { timeoutMs: 120_000 });
    t.is(JSON.parse(again.slice(again.indexOf('{'))).jobs[0].error, 0);

    // And the file behind the export holds what the export served.
    await must('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, server.uri]);
    t.is(await server.stop(), 0);
  });
}
