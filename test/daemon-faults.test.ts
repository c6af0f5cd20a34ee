/**
 * A failing provider fails its own requests only: in one daemon, a RAM disk that runs out
 * of its memory limit (ENOSPC) and an http disk whose server goes away (EIO) answer their
 * NBD clients with errors that show in `stats`, while a raw device beside them goes on
 * serving and the daemon keeps answering.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { DeviceStats, DeviceSummary } from '../core/daemon/devices';
import { startDaemon, type RunningDaemon } from './helpers/daemon';
import { startNginx } from './helpers/nginx';
import { run } from './helpers/run';

const MiB = 1 << 20;

async function withNbd(daemon: RunningDaemon, name: string, spec: string): Promise<string> {
  const socket = path.join(daemon.dir, `${name}.sock`);
  await daemon.ok<DeviceSummary>({ op: 'create', spec, name, exports: [`nbd:${socket}`] });
  return `nbd+unix:///?socket=${socket}`;
}

test('a full disk and a vanished web server fail their own requests; the device beside them is untouched', async (t) => {
  const daemon = await startDaemon();
  t.teardown(() => daemon.stop());
  const served = path.join(daemon.dir, 'served');
  fs.mkdirSync(served);
  fs.writeFileSync(path.join(served, 'disk.raw'), Buffer.alloc(4 * MiB, 0x33));
  const nginx = await startNginx(served);
  t.teardown(() => nginx.stop());
  const raw = path.join(daemon.dir, 'good.raw');
  fs.writeFileSync(raw, Buffer.alloc(4 * MiB));

  const full = await withNbd(daemon, 'full', 'memory,limit=1M:16M');
  // No cache in front: every read must reach the server.
  const remote = await withNbd(daemon, 'remote', `http,retries=0,timeout=5:${nginx.base}/disk.raw`);
  const good = await withNbd(daemon, 'good', `raw:${raw}`);

  const remoteOk = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x33 0 64k', remote], { timeoutMs: 60_000 });
  t.is(remoteOk.code, 0, remoteOk.stderr);
  t.notRegex(remoteOk.stdout, /Pattern verification failed/);

  // 2 MiB of new data into a disk allowed 1 MiB of RAM.
  const tooMuch = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 0 2M', full], { timeoutMs: 60_000 });
  t.regex(tooMuch.stdout + tooMuch.stderr, /No space left on device/);

  await nginx.stop();
  const gone = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read 1M 64k', remote], { timeoutMs: 60_000 });
  t.regex(gone.stdout + gone.stderr, /Input\/output error/);

  // The good device, and the daemon, go on as before.
  const goodWrite = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x55 0 1M', '-c', 'flush', '-c', 'read -P 0x55 0 1M', good], { timeoutMs: 60_000 });
  t.is(goodWrite.code, 0, goodWrite.stderr);
  t.notRegex(goodWrite.stdout, /Pattern verification failed/);
  t.true(fs.readFileSync(raw).subarray(0, MiB).every((b) => b === 0x55));

  const stats = async (name: string) => daemon.ok<DeviceStats>({ op: 'stats', device: name });
  t.true((await stats('full')).operations.write.errors > 0, 'the ENOSPC writes count as errors');
  t.true((await stats('remote')).operations.read.errors > 0, 'the failed reads count as errors');
  const goodStats = await stats('good');
  t.is(goodStats.operations.write.errors + goodStats.operations.read.errors, 0);
  t.true(goodStats.operations.write.count > 0);
  const list = await daemon.ok<DeviceSummary[]>({ op: 'list' });
  t.deepEqual(list.map((d) => [d.name, d.state]), [['full', 'running'], ['remote', 'running'], ['good', 'running']]);

  // The full disk still serves what fits: a small write and its read-back succeed.
  const small = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x66 8M 4k', '-c', 'read -P 0x66 8M 4k', full], { timeoutMs: 60_000 });
  t.notRegex(small.stdout + small.stderr, /Pattern verification failed|error/i);
});
