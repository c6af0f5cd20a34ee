/**
 * The `nbd` export kind of `tapkit daemon`: devices created from the config file and by
 * `tapkit ctl create --export nbd:...`, reached by qemu-io, qemu-img and nbdinfo over a
 * Unix socket and TCP; pause holds NBD requests until unpause; destroy and SIGTERM stop
 * the export, flush the device and remove the socket.
 */
import test from 'ava';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import type { DeviceStats, DeviceSummary } from '../core/daemon/devices';
import { parseListenTarget } from '../core/nbd/uri';
import { CLI, startDaemon } from './helpers/daemon';
import { must, run } from './helpers/run';
import { tempDir } from './helpers/temp';

const exec = promisify(execFile);

async function ctl(control: string, ...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await exec(process.execPath, [CLI, 'ctl', '--control', control, ...args], { timeout: 30_000 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

test('export arguments: socket paths, unix:, tcp:, HOST:PORT; nonsense refused', (t) => {
  t.deepEqual(parseListenTarget('/run/x.sock'), { path: '/run/x.sock' });
  t.deepEqual(parseListenTarget('unix:rel.sock', '/srv'), { path: '/srv/rel.sock' });
  t.deepEqual(parseListenTarget('./a.sock', '/srv'), { path: '/srv/a.sock' });
  t.deepEqual(parseListenTarget('tcp:127.0.0.1:10809'), { host: '127.0.0.1', port: 10809 });
  t.deepEqual(parseListenTarget('[::1]:0'), { host: '::1', port: 0 });
  t.deepEqual(parseListenTarget(':10809'), { host: '0.0.0.0', port: 10809 });
  t.throws(() => parseListenTarget('nowhere'), { message: /neither a socket path/ });
  t.throws(() => parseListenTarget('tcp:host'), { message: /not tcp:HOST:PORT/ });
  t.throws(() => parseListenTarget('127.0.0.1:70000'), { message: /neither/ });
  t.throws(() => parseListenTarget('unix:'), { message: /no socket path/ });
});

test('a config device on a Unix socket and a ctl device on TCP, reached by qemu and nbdinfo', async (t) => {
  const dir = tempDir(t, 'tapkit-nbd-daemon-');
  const image = path.join(dir, 'disk.raw');
  await must('qemu-img', ['create', '-q', '-f', 'raw', image, '8M']);
  const socket = path.join(dir, 'disk.sock');
  const config = path.join(dir, 'daemon.json');
  fs.writeFileSync(config, JSON.stringify({ devices: [{ name: 'disk', spec: `raw:${image}`, exports: [`nbd:unix:${socket}`] }] }));
  const daemon = await startDaemon(['--config', config]);
  t.teardown(() => daemon.stop());

  const [disk] = await daemon.ok<DeviceSummary[]>({ op: 'list' });
  t.deepEqual(disk.exports, [{ kind: 'nbd', target: `nbd+unix:///?socket=${socket}` }]);
  const unixUri = disk.exports[0].target;

  // Writes through NBD land in the file behind the daemon's device.
  await must('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5c 1000 70000', '-c', 'flush', unixUri]);
  const bytes = fs.readFileSync(image);
  t.true(bytes.subarray(1000, 71000).every((b) => b === 0x5c));
  t.is(bytes[999], 0);

  // A second device from the CLI, on TCP with a port the kernel picks.
  const created = await ctl(daemon.control, 'create', 'memory:32M', '--name', 'scratch', '--export', 'nbd:tcp:127.0.0.1:0');
  t.is(created.code, 0, created.stderr);
  const scratch = (await daemon.ok<DeviceSummary[]>({ op: 'list' })).find((d) => d.name === 'scratch')!;
  const tcpUri = scratch.exports[0].target;
  t.regex(tcpUri, /^nbd:\/\/127\.0\.0\.1:[1-9]\d*\/$/);
  const info = JSON.parse(await must('nbdinfo', ['--json', tcpUri]));
  t.is(info.exports[0]['export-size'], 32 << 20);
  t.is(info.exports[0].description, `tapkit device ${scratch.id}`);
  t.true(info.exports[0]['can_multi_conn']);
  await must('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 5000000 4096', tcpUri]);
  const check = await must('qemu-io', ['-f', 'raw', '-c', 'read -P 0x77 5000000 4096', '-c', 'read -P 0 4999999 1', tcpUri]);
  t.notRegex(check, /Pattern verification failed/);

  // The export's counters and the device's operations show up in stats.
  // qemu-io has exited, but the server may not have seen its connection close yet: wait (bounded).
  let stats = await daemon.ok<DeviceStats>({ op: 'stats', device: 'scratch' });
  for (let tries = 0; (stats.exports[0].stats as { connections: number }).connections !== 0 && tries < 100; tries++) {
    await new Promise((r) => setTimeout(r, 100));
    stats = await daemon.ok<DeviceStats>({ op: 'stats', device: 'scratch' });
  }
  t.like(stats.exports[0], { kind: 'nbd', target: tcpUri });
  t.like(stats.exports[0].stats as object, { connections: 0 });
  t.true((stats.exports[0].stats as { accepted: number }).accepted >= 3);
  t.true(stats.operations.write.count >= 1);

  // Destroy stops the export: the port is closed, the other device is untouched.
  t.is((await ctl(daemon.control, 'destroy', 'scratch')).code, 0);
  const gone = await run('nbdinfo', ['--size', tcpUri], { timeoutMs: 20_000 });
  t.not(gone.code, 0);
  t.is((await must('nbdinfo', ['--size', unixUri])).trim(), String(8 << 20));

  // SIGTERM: exports stop, the socket file goes away, the daemon exits 0.
  t.is(await daemon.stop(), 0);
  t.false(fs.existsSync(socket));
});

test('pause holds NBD requests until unpause; they then complete', async (t) => {
  const dir = tempDir(t, 'tapkit-nbd-daemon-');
  const socket = path.join(dir, 'm.sock');
  const daemon = await startDaemon();
  t.teardown(() => daemon.stop());
  const created = await ctl(daemon.control, 'create', 'memory:16M', '--name', 'm', '--export', `nbd:${socket}`);
  t.is(created.code, 0, created.stderr);
  const uri = `nbd+unix:///?socket=${socket}`;

  t.is((await ctl(daemon.control, 'pause', 'm')).code, 0);
  let done = false;
  const writer = run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 0 65536', uri], { timeoutMs: 60_000 }).then((r) => {
    done = true;
    return r;
  });
  // Long enough for the handshake and the write to reach the paused device.
  await new Promise((r) => setTimeout(r, 1500));
  t.false(done, 'the write completed on a paused device');
  t.is((await ctl(daemon.control, 'unpause', 'm')).code, 0);
  const result = await writer;
  t.is(result.code, 0, result.stderr);
  const check = await must('qemu-io', ['-f', 'raw', '-c', 'read -P 0x42 0 65536', uri]);
  t.notRegex(check, /Pattern verification failed/);
});

test('bad nbd export arguments fail the create and leave nothing behind', async (t) => {
  const dir = tempDir(t, 'tapkit-nbd-daemon-');
  const daemon = await startDaemon();
  t.teardown(() => daemon.stop());
  const bad = await ctl(daemon.control, 'create', 'memory:1M', '--export', 'nbd:nowhere');
  t.is(bad.code, 1);
  t.regex(bad.stderr, /nbd export: 'nowhere' is neither a socket path/);
  const relative = await ctl(daemon.control, 'create', 'memory:1M', '--export', 'nbd:unix:relative.sock');
  t.is(relative.code, 1);
  t.regex(relative.stderr, /must be absolute/);

  // A socket someone else serves is not stolen; the half-made device is closed.
  const socket = path.join(dir, 'taken.sock');
  const first = await ctl(daemon.control, 'create', 'memory:1M', '--name', 'first', '--export', `nbd:${socket}`);
  t.is(first.code, 0, first.stderr);
  const second = await ctl(daemon.control, 'create', 'memory:1M', '--name', 'second', '--export', `nbd:tcp:127.0.0.1:0`, '--export', `nbd:${socket}`);
  t.is(second.code, 1);
  t.regex(second.stderr, /cannot listen.*another server is listening/);
  const names = (await daemon.ok<DeviceSummary[]>({ op: 'list' })).map((d) => d.name);
  t.deepEqual(names, ['first']);
  t.is((await must('nbdinfo', ['--size', `nbd+unix:///?socket=${socket}`])).trim(), String(1 << 20));
});
