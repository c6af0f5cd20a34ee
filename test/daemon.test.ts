/**
 * `tapkit daemon` and `tapkit ctl`: a real daemon process driven over its control socket
 * and through the CLI. (Write streams through exports are in the export tests.)
 */
import test from 'ava';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { CLI, startDaemon } from './helpers/daemon';
import type { DeviceSummary } from '../core/daemon/devices';

const run = promisify(execFile);

async function ctl(control: string, ...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, [CLI, 'ctl', '--control', control, ...args]);
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

function openFds(pid: number): number {
  return fs.readdirSync(`/proc/${pid}/fd`).length;
}

test('create, list, stats, pause, unpause and destroy through tapkit ctl', async (t) => {
  const daemon = await startDaemon();
  t.teardown(() => daemon.stop());
  const created = await ctl(daemon.control, 'create', 'memory:64M', '--name', 'scratch');
  t.is(created.code, 0, created.stderr);
  const id = created.stdout.trim();
  t.regex(id, /^\d+$/);

  const list = JSON.parse((await ctl(daemon.control, 'list', '--json')).stdout) as DeviceSummary[];
  t.is(list.length, 1);
  t.like(list[0], { id, name: 'scratch', spec: 'memory:64M', state: 'running', size: 64 << 20 });
  t.is(list[0].chain[0].provider, 'memory');

  t.is((await ctl(daemon.control, 'pause', id)).code, 0);
  t.like((await daemon.ok<DeviceSummary[]>({ op: 'list' }))[0], { state: 'paused' });
  t.is((await ctl(daemon.control, 'unpause', id)).code, 0);
  t.like((await daemon.ok<DeviceSummary[]>({ op: 'list' }))[0], { state: 'running' });

  const stats = JSON.parse((await ctl(daemon.control, 'stats', id, '--json')).stdout);
  t.deepEqual(Object.keys(stats.operations).sort(), ['cache', 'extents', 'flush', 'read', 'trim', 'write', 'zero']);
  t.is(stats.paused, false);

  t.is((await ctl(daemon.control, 'destroy', id)).code, 0);
  t.deepEqual(await daemon.ok({ op: 'list' }), []);
  const again = await ctl(daemon.control, 'destroy', id);
  t.is(again.code, 1);
  t.regex(again.stderr, /no device/);
});

test('unpause --spec reopens a paused device on a new chain of the same size', async (t) => {
  const daemon = await startDaemon();
  t.teardown(() => daemon.stop());
  const file = path.join(daemon.dir, 'next.raw');
  fs.writeFileSync(file, Buffer.alloc(1 << 20));
  const { id } = await daemon.ok<DeviceSummary>({ op: 'create', spec: 'memory:1M' });
  const notPaused = await daemon.call({ op: 'unpause', device: id, spec: `raw:${file}` });
  t.false(notPaused.ok);
  await daemon.ok({ op: 'pause', device: id });
  const wrongSize = await daemon.call({ op: 'unpause', device: id, spec: 'memory:2M' });
  t.false(wrongSize.ok);
  t.regex(JSON.stringify(wrongSize), /refusing to change size/);
  const summary = await daemon.ok<DeviceSummary>({ op: 'unpause', device: id, spec: `raw:${file}` });
  t.is(summary.spec, `raw:${file}`);
  t.is(summary.chain[0].provider, 'raw');
  t.is(summary.state, 'running');
});

test('destroy leaves no file descriptor behind', async (t) => {
  const daemon = await startDaemon();
  t.teardown(() => daemon.stop());
  const file = path.join(daemon.dir, 'disk.raw');
  fs.writeFileSync(file, Buffer.alloc(1 << 20));
  const before = openFds(daemon.child.pid!);
  const ids: string[] = [];
  for (let i = 0; i < 5; i++) ids.push((await daemon.ok<DeviceSummary>({ op: 'create', spec: `raw:${file}` })).id);
  t.true(openFds(daemon.child.pid!) >= before + 5);
  for (const id of ids) await daemon.ok({ op: 'destroy', device: id });
  t.is(openFds(daemon.child.pid!), before);
});

test('malformed and oversized control messages get errors; the daemon keeps serving', async (t) => {
  const daemon = await startDaemon();
  t.teardown(() => daemon.stop());
  const exchange = (payload: string | Buffer) =>
    new Promise<string>((resolve) => {
      const socket = net.createConnection(daemon.control);
      let answer = '';
      socket.on('data', (c) => (answer += c));
      socket.on('close', () => resolve(answer));
      socket.on('error', () => resolve(answer));
      socket.on('connect', () => {
        socket.write(payload);
        setTimeout(() => socket.end(), 500);
      });
    });
  t.regex(await exchange('{not json\n'), /"code":"EINVAL".*malformed JSON/);
  t.regex(await exchange('[1,2]\n'), /a request is a JSON object/);
  t.regex(await exchange('{"op":"launch"}\n'), /unknown op/);
  t.regex(await exchange('{"op":"create"}\n'), /field 'spec' must be a string/);
  t.regex(await exchange('{"op":"create","spec":"memory:12Q"}\n'), /malformed memory size/);
  t.regex(await exchange('{"op":"create","spec":"nosuch:thing"}\n'), /unknown provider 'nosuch'/);
  t.regex(await exchange('{"op":"create","spec":"memory:1M","exports":["teleport:x"]}\n'), /unknown export 'teleport:x'/);
  t.regex(await exchange(Buffer.alloc(2 << 20, 0x61)), /EFBIG/);
  t.true((await daemon.call({ op: 'ping' })).ok);
  // A failed create left nothing behind.
  t.deepEqual(await daemon.ok({ op: 'list' }), []);
});

test('the control socket is mode 0600 and a second daemon on it refuses to start', async (t) => {
  const daemon = await startDaemon();
  t.teardown(() => daemon.stop());
  t.is(fs.statSync(daemon.control).mode & 0o777, 0o600);
  const second = await run(process.execPath, [CLI, 'daemon', '--control', daemon.control]).catch((e) => e);
  t.is(second.code, 1);
  t.regex(second.stderr, /another tapkit daemon is running/);
  t.true((await daemon.call({ op: 'ping' })).ok);
});

test('a stale socket left by a dead daemon does not stop a new one', async (t) => {
  const first = await startDaemon();
  t.teardown(() => fs.rmSync(first.dir, { recursive: true, force: true }));
  first.child.kill('SIGKILL');
  await new Promise((r) => first.child.once('exit', r));
  t.true(fs.existsSync(first.control));
  const second = await startDaemon([], first.dir);
  t.teardown(() => second.stop());
  t.true((await second.call({ op: 'ping' })).ok);
});

test('the config file starts devices; SIGHUP adds and removes them without touching the others', async (t) => {
  const dir = fs.mkdtempSync('/tmp/tapkit-config-');
  const config = path.join(dir, 'tapkit.json');
  const write = (devices: unknown[]) => fs.writeFileSync(config, JSON.stringify({ devices }));
  write([
    { name: 'keep', spec: 'memory:1M' },
    { name: 'drop', spec: 'memory:2M' },
  ]);
  const daemon = await startDaemon(['--config', config], dir);
  t.teardown(() => daemon.stop());
  const before = await daemon.ok<DeviceSummary[]>({ op: 'list' });
  t.deepEqual(before.map((d) => d.name).sort(), ['drop', 'keep']);
  const adHoc = await daemon.ok<DeviceSummary>({ op: 'create', spec: 'memory:3M', name: 'adhoc' });
  const keepId = before.find((d) => d.name === 'keep')!.id;

  write([
    { name: 'keep', spec: 'memory:1M' },
    { name: 'new', spec: 'memory:4M' },
  ]);
  daemon.child.kill('SIGHUP');
  const deadline = Date.now() + 10_000;
  let after: DeviceSummary[] = [];
  while (Date.now() < deadline) {
    after = await daemon.ok<DeviceSummary[]>({ op: 'list' });
    if (after.some((d) => d.name === 'new') && !after.some((d) => d.name === 'drop')) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  t.deepEqual(after.map((d) => d.name).sort(), ['adhoc', 'keep', 'new']);
  t.is(after.find((d) => d.name === 'keep')!.id, keepId, 'an unchanged device is not recreated');
  t.is(after.find((d) => d.name === 'adhoc')!.id, adHoc.id, 'devices made with ctl survive a reload');

  // An invalid config changes nothing.
  fs.writeFileSync(config, '{ broken');
  await daemon.ok({ op: 'reload' });
  t.deepEqual((await daemon.ok<DeviceSummary[]>({ op: 'list' })).map((d) => d.name).sort(), ['adhoc', 'keep', 'new']);
  t.regex(daemon.log(), /reload refused: the config is invalid/);
});

test('an invalid config file at start is one clear line and exit 2', async (t) => {
  const dir = fs.mkdtempSync('/tmp/tapkit-config-');
  const config = path.join(dir, 'bad.json');
  fs.writeFileSync(config, JSON.stringify({ devices: [{ name: 'x' }] }));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const r = await run(process.execPath, [CLI, 'daemon', '--control', path.join(dir, 'c.sock'), '--config', config]).catch((e) => e);
  t.is(r.code, 2);
  t.regex(r.stderr, /devices\[0\] \('x'\) needs a 'spec'/);
});

test('Prometheus metrics on a loopback port; logs are JSON lines', async (t) => {
  const port = 20000 + Math.floor(Math.random() * 20000);
  const daemon = await startDaemon(['--metrics', `127.0.0.1:${port}`, '--log-level', 'debug']);
  t.teardown(() => daemon.stop());
  await daemon.ok({ op: 'create', spec: 'memory:1M' });
  const body = await new Promise<string>((resolve, reject) => {
    http.get(`http://127.0.0.1:${port}/metrics`, (res) => {
      let text = '';
      res.on('data', (c) => (text += c));
      res.on('end', () => resolve(text));
    }).on('error', reject);
  });
  t.regex(body, /# TYPE tapkit_requests_total counter/);
  t.regex(body, /tapkit_requests_total\{device="0",op="read"\} 0/);
  t.regex(body, /tapkit_request_duration_seconds_bucket\{device="0",op="write",le="\+Inf"\} 0/);
  t.regex(body, /tapkit_size_bytes\{device="0"\} 1048576/);
  for (const line of daemon.log().trim().split('\n')) {
    const entry = JSON.parse(line);
    t.truthy(entry.time && entry.level && entry.msg);
  }
});

test('SIGTERM closes every device and exits 0', async (t) => {
  const daemon = await startDaemon();
  await daemon.ok({ op: 'create', spec: 'memory:1M' });
  await daemon.ok({ op: 'create', spec: 'memory:1M' });
  t.is(await daemon.stop('SIGTERM'), 0);
  t.is((daemon.log().match(/device destroyed/g) ?? []).length, 2);
  t.false(fs.existsSync(daemon.control));
});
