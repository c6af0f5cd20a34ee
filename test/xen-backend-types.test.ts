/**
 * Backend types and the qemu-stub on the sim platform, through the CLI as a toolstack
 * would use it: `tapkit xen serve --backend-type vbd|qdisk|vbd3` with nodes written by
 * `tapkit xen attach --backend-type`, and `tapkit xen qemu-stub` started with the QEMU
 * command line libxl 4.17 builds for a PV guest (QMP over its socket, device-model state
 * in XenStore, only its own domain's qdisks). The C frontend (Xen's headers,
 * libxenstore) drives each device; it follows whatever `backend` path its node names.
 */
import test from 'ava';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { specFromParams } from '../core/ring/backend-types';
import { parseQemuArguments, JsonObjectSplitter } from '../core/ring/qemu-stub';
import type { DeviceSummary } from '../core/daemon/devices';
import { CLI, startDaemon } from './helpers/daemon';
import { firstMismatch, runFrontend } from './xen/harness';
import { fileTempDir } from './helpers/temp';

const run = promisify(execFile);
const DEVID = 51712;

function xs(dir: string, tool: string, ...args: string[]) {
  return run(tool, args, { env: { ...process.env, XENSTORED_PATH: path.join(dir, 'xenstored.sock') }, timeout: 10_000 });
}

/** A tapkit child process; its stderr collected, killed at teardown. */
function startTapkit(t: any, args: string[]): { child: ChildProcess; output: () => string; exited: Promise<number | null> } {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout!.on('data', (d) => (output += d));
  child.stderr!.on('data', (d) => (output += d));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  t.teardown(() => child.kill('SIGKILL'));
  return { child, output: () => output, exited };
}

async function until(what: string, check: () => Promise<boolean> | boolean, log: () => string, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${what} did not happen within ${timeoutMs / 1000} s:\n${log()}`);
}

async function read(dir: string, node: string): Promise<string | undefined> {
  return xs(dir, 'xenstore-read', node).then(
    (r) => r.stdout.trim(),
    () => undefined,
  );
}

/** A raw image file (zeros) of `bytes`. */
function image(dir: string, name: string, bytes: number): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, Buffer.alloc(0));
  fs.truncateSync(file, bytes);
  return file;
}

test('qdisk params in QEMU format names become tapkit specs; others pass through', (t) => {
  t.is(specFromParams('qdisk', 'aio:/images/a.img'), 'raw:/images/a.img');
  t.is(specFromParams('qdisk', 'raw:/images/a.img'), 'raw:/images/a.img');
  t.is(specFromParams('qdisk', 'vhd:/images/a.vhd'), 'vhd:/images/a.vhd');
  t.is(specFromParams('qdisk', 'qcow2:/images/a.qcow2'), 'qcow2:/images/a.qcow2');
  t.is(specFromParams('qdisk', 'memory:64M'), 'memory:64M', 'a tapkit spec written by hand');
  t.throws(() => specFromParams('qdisk', 'qcow:/images/old.qcow'), { message: /does not read QEMU's 'qcow'/ });
  t.throws(() => specFromParams('qdisk', 'aio:'), { message: /names no file/ });
  t.is(specFromParams('vbd', 'aio:/x'), 'aio:/x');
  t.is(specFromParams('vbd3', 'vhd:/x.vhd'), 'vhd:/x.vhd');
});

test("libxl's device-model command line: the domain, the QMP chardevs behind -mon, -S", (t) => {
  const args = parseQemuArguments([
    '-xen-domid', '7', '-no-shutdown',
    '-chardev', 'socket,id=libxl-cmd,path=/run/xen/qmp-libxl-7,server=on,wait=off',
    '-mon', 'chardev=libxl-cmd,mode=control',
    '-chardev', 'socket,id=libxenstat-cmd,path=/run/xen/qmp-libxenstat-7,server=on,wait=off',
    '-mon', 'chardev=libxenstat-cmd,mode=control',
    '-nodefaults', '-name', 'guest', '-vnc', 'none', '-display', 'none', '-nographic', '-machine', 'xenpv', '-m', '513',
  ]);
  t.deepEqual(args, { domid: 7, qmp: [{ path: '/run/xen/qmp-libxl-7' }, { path: '/run/xen/qmp-libxenstat-7' }], paused: false, name: 'guest' });
  const restricted = parseQemuArguments(['-xen-domid', '3', '-chardev', 'socket,id=libxl-cmd,fd=9,server=on,wait=off', '-S', '-mon', 'chardev=libxl-cmd,mode=control']);
  t.deepEqual(restricted.qmp, [{ fd: 9 }]);
  t.true(restricted.paused);
  t.throws(() => parseQemuArguments(['-machine', 'xenpv']), { message: /no -xen-domid/ });
  t.throws(() => parseQemuArguments(['-xen-domid', '0']), { message: /not a guest domain/ });
});

test('QMP messages split on object boundaries, whatever the chunking', (t) => {
  const s = new JsonObjectSplitter();
  t.deepEqual(s.push('{"execute": "qmp_capa'), []);
  t.deepEqual(s.push('bilities", "id": 1}\r\n{"execute":"a}{"'), [{ execute: 'qmp_capabilities', id: 1 }]);
  t.deepEqual(s.push(', "id": 2}'), [{ execute: 'a}{', id: 2 }]);
});

for (const type of ['vbd', 'qdisk', 'vbd3'] as const) {
  test.serial(`xen serve --backend-type ${type} serves the C frontend on backend/${type}`, async (t) => {
    const dir = fileTempDir(`tapkit-xen-${type}-`);
    t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
    const file = image(dir, 'disk.img', 64 << 20);
    const serve = startTapkit(t, ['xen', 'serve', '--platform', `sim:${dir}`, '--backend-type', type]);
    await until('serving', () => serve.output().includes('serving'), serve.output);
    // What the toolstack writes as params: libxl's FORMAT:PATH for qdisk, a tapkit spec otherwise.
    const params = type === 'qdisk' ? `aio:${file}` : file;
    await run(process.execPath, [CLI, 'xen', 'attach', '--platform', `sim:${dir}`, '--backend-type', type, '--domid', '5', '--devid', String(DEVID), params], { timeout: 30_000 });
    const be = `/local/domain/0/backend/${type}/5/${DEVID}`;
    t.is(await read(dir, `/local/domain/5/device/vbd/${DEVID}/backend`), be);
    await until('InitWait', async () => (await read(dir, `${be}/state`)) === '2', serve.output);
    if (type !== 'vbd') t.is(await read(dir, `/local/domain/0/backend/vbd/5/${DEVID}/state`), undefined);
    const rw = await runFrontend(dir, 5, DEVID, ['rw', '--seed', '9']);
    t.is(rw.code, 0, rw.stdout + rw.stderr + serve.output());
    t.regex(rw.stdout, /ok rw x86_64-abi/);
    t.regex(serve.output(), new RegExp(`\\b${type} 5/${DEVID}: connected`), 'the log names the backend type');
    const detached = await run(process.execPath, [CLI, 'xen', 'detach', '--platform', `sim:${dir}`, '--backend-type', type, '--domid', '5', '--devid', String(DEVID)], { timeout: 30_000 });
    t.is(detached.stderr, '');
    t.is(await read(dir, `${be}/state`), undefined);
    serve.child.kill('SIGTERM');
    t.is(await serve.exited, 0, serve.output());
    // The writes reached the file the params named.
    const data = fs.readFileSync(file).subarray(0, 64 * 4096);
    t.is(firstMismatch(data, 0, 9), -1);
  });
}

/** A QMP client: the greeting, then one reply per command. */
async function qmpSession(socketPath: string, commands: string[]): Promise<unknown[]> {
  const socket = net.connect(socketPath);
  const splitter = new JsonObjectSplitter();
  const messages: unknown[] = [];
  let wake = () => undefined as void;
  socket.setEncoding('utf8');
  socket.on('data', (d: string) => {
    messages.push(...splitter.push(d));
    wake();
  });
  const next = async (n: number) => {
    const deadline = Date.now() + 20_000;
    while (messages.length < n) {
      if (Date.now() > deadline) throw new Error(`QMP: ${messages.length} of ${n} messages`);
      await new Promise<void>((r) => {
        wake = r;
        setTimeout(r, 100);
      });
    }
  };
  await next(1);
  let id = 1;
  for (const c of commands) {
    socket.write(`${JSON.stringify({ execute: c, id: id++ })}\r\n`);
    await next(id);
  }
  socket.destroy();
  return messages;
}

test.serial('qemu-stub: started with libxl\'s arguments, it reports running, answers QMP, serves only its domain\'s qdisks, and stops on SIGHUP', async (t) => {
  const dir = fileTempDir('tapkit-xen-qemu-stub-');
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = image(dir, 'disk.img', 32 << 20);
  const qmp = path.join(dir, 'qmp-libxl-5');
  const stat = path.join(dir, 'qmp-libxenstat-5');
  const stub = startTapkit(t, [
    'xen', 'qemu-stub', '--platform', `sim:${dir}`, '--',
    '-xen-domid', '5', '-no-shutdown',
    '-chardev', `socket,id=libxl-cmd,path=${qmp},server=on,wait=off`, '-mon', 'chardev=libxl-cmd,mode=control',
    '-chardev', `socket,id=libxenstat-cmd,path=${stat},server=on,wait=off`, '-mon', 'chardev=libxenstat-cmd,mode=control',
    '-nodefaults', '-name', 'guest5', '-xen-attach', '-machine', 'xenpv', '-m', '257',
  ]);
  await until('device-model state running', async () => fs.existsSync(path.join(dir, 'xenstored.sock')) && (await read(dir, '/local/domain/0/device-model/5/state')) === 'running', stub.output);

  const replies = await qmpSession(qmp, ['qmp_capabilities', 'query-chardev', 'query-status', 'query-vnc', 'human-monitor-command']);
  t.like(replies[0], { QMP: { version: { qemu: { major: 7 } } } });
  t.deepEqual(replies.slice(1, 3), [
    { return: {}, id: 1 },
    { return: [], id: 2 },
  ]);
  t.like(replies[3], { return: { status: 'running', running: true }, id: 3 });
  t.like(replies[4], { return: { enabled: false }, id: 4 });
  t.like(replies[5], { error: { class: 'CommandNotFound' }, id: 5 });
  t.like((await qmpSession(stat, ['qmp_capabilities']))[1], { return: {}, id: 1 });

  // As libxl would have (before the spawn): a qdisk of domain 5, and one of domain 6 that is not this stub's.
  for (const domid of [5, 6]) await run(process.execPath, [CLI, 'xen', 'attach', '--platform', `sim:${dir}`, '--backend-type', 'qdisk', '--domid', String(domid), '--devid', String(DEVID), `aio:${file}`], { timeout: 30_000 });
  await until('InitWait', async () => (await read(dir, `/local/domain/0/backend/qdisk/5/${DEVID}/state`)) === '2', stub.output);
  const rw = await runFrontend(dir, 5, DEVID, ['rw', '--seed', '21']);
  t.is(rw.code, 0, rw.stdout + rw.stderr + stub.output());
  t.is(await read(dir, `/local/domain/0/backend/qdisk/6/${DEVID}/state`), '1', "domain 6's qdisk is left to its own device model");

  stub.child.kill('SIGHUP');
  t.is(await stub.exited, 0, stub.output());
  t.false(fs.existsSync(qmp), 'the QMP socket is removed');
  t.is(firstMismatch(fs.readFileSync(file).subarray(0, 64 * 4096), 0, 21), -1);
});

test.serial('qemu-stub with -S (libxl pre-opened QMP): prelaunch until cont, then running', async (t) => {
  const dir = fileTempDir('tapkit-xen-qemu-stub-s-');
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const qmp = path.join(dir, 'qmp');
  const stub = startTapkit(t, ['xen', 'qemu-stub', '--platform', `sim:${dir}`, '--', '-xen-domid', '9', '-chardev', `socket,id=libxl-cmd,path=${qmp},server=on,wait=off`, '-S', '-mon', 'chardev=libxl-cmd,mode=control']);
  await until('QMP socket', () => fs.existsSync(qmp) && stub.output().includes('serving'), stub.output);
  const before = await qmpSession(qmp, ['qmp_capabilities', 'query-status']);
  t.like(before[2], { return: { status: 'prelaunch', running: false } });
  t.is(await read(dir, '/local/domain/0/device-model/9/state'), undefined);
  const after = await qmpSession(qmp, ['qmp_capabilities', 'cont', 'query-status']);
  t.like(after[3], { return: { status: 'running' } });
  t.is(await read(dir, '/local/domain/0/device-model/9/state'), 'running');
  const quit = await qmpSession(qmp, ['qmp_capabilities', 'quit']);
  t.like(quit[2], { return: {}, id: 2 });
  t.is(await stub.exited, 0, stub.output());
});

test.serial("xen attach --platform xen (libxenstore, as on a dom0) writes a vbd3 with libxl's permissions; the backend serves it; detach removes it", async (t) => {
  const dir = fileTempDir('tapkit-xen-vbd3-xs-');
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const serve = startTapkit(t, ['xen', 'serve', '--platform', `sim:${dir}`, '--backend-type', 'vbd3']);
  await until('serving', () => serve.output().includes('serving'), serve.output);
  // libxenstore reaches the sim's xenstored exactly as Xen's tools do.
  const env = { ...process.env, XENSTORED_PATH: path.join(dir, 'xenstored.sock') };
  await run(process.execPath, [CLI, 'xen', 'attach', '--platform', 'xen', '--backend-type', 'vbd3', '--domid', '4', '--devid', '51728', 'memory:32M'], { env, timeout: 30_000 });
  const be = '/local/domain/0/backend/vbd3/4/51728';
  const fe = '/local/domain/4/device/vbd/51728';
  const perms = (await xs(dir, 'xenstore-ls', '-p', '/local/domain')).stdout;
  t.regex(perms, /^\s*51728 = ""[ .]+\(n0,r4\)$/m, `backend directory: dom0 owns it, the guest reads it\n${perms}`);
  t.regex(perms, /^\s*51728 = ""[ .]+\(n4,r0\)$/m, `frontend directory: the guest owns it, dom0 reads it\n${perms}`);
  t.is(await read(dir, `${be}/type`), 'vbd3');
  await until('InitWait', async () => (await read(dir, `${be}/state`)) === '2', serve.output);
  const rw = await runFrontend(dir, 4, 51728, ['rw', '--seed', '4']);
  t.is(rw.code, 0, rw.stdout + rw.stderr + serve.output());
  const detached = await run(process.execPath, [CLI, 'xen', 'detach', '--platform', 'xen', '--backend-type', 'vbd3', '--domid', '4', '--devid', '51728'], { env, timeout: 30_000 });
  t.is(detached.stderr, '');
  t.is(await read(dir, `${be}/state`), undefined);
  t.is(await read(dir, `${fe}/state`), undefined);
});

test.serial('the daemon\'s xen export with type=vbd3,grants=copy,attach serves the C frontend; a bad type or grants is refused', async (t) => {
  const daemon = await startDaemon();
  t.teardown(() => daemon.stop());
  const dir = fileTempDir('tapkit-xen-daemon-types-');
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const a = await daemon.ok<DeviceSummary>({ op: 'create', spec: 'memory:64M', name: 'a', exports: [`xen:5/${DEVID},platform=sim:${dir},type=vbd3,grants=copy,attach`] });
  t.deepEqual(a.exports, [{ kind: 'xen', target: `sim:${dir} /local/domain/0/backend/vbd3/5/${DEVID}` }]);
  t.is(await read(dir, `/local/domain/5/device/vbd/${DEVID}/backend`), `/local/domain/0/backend/vbd3/5/${DEVID}`);
  const rw = await runFrontend(dir, 5, DEVID, ['rw', '--seed', '12']);
  t.is(rw.code, 0, rw.stdout + rw.stderr + daemon.log());
  t.regex(daemon.log(), /data by grant copy/);
  for (const bad of ['type=tap', 'grants=sometimes']) {
    const r = await daemon.call({ op: 'create', spec: 'memory:1M', exports: [`xen:6/${DEVID},platform=sim:${dir},${bad},attach`] });
    t.false(r.ok);
    if (!r.ok) t.regex(r.error.message, bad.startsWith('type') ? /type 'tap' is not one of vbd, qdisk, vbd3/ : /grants 'sometimes' is not one of auto, copy, map/);
  }
  // A qdisk on the same platform keeps it (and its xenstored) up while a goes.
  await daemon.ok<DeviceSummary>({ op: 'create', spec: 'memory:8M', name: 'b', exports: [`xen:7/${DEVID},platform=sim:${dir},type=qdisk,grants=copy,attach`] });
  await daemon.ok({ op: 'destroy', device: a.id });
  t.is(await read(dir, `/local/domain/0/backend/vbd3/5/${DEVID}/state`), undefined);
  t.is(await read(dir, `/local/domain/0/backend/qdisk/7/${DEVID}/state`), '2');
});

test.serial('examples/xen/vbd3-attach (xenstore-write, xenstore-chmod) gives the frontend a vbd3 the backend serves', async (t) => {
  const dir = fileTempDir('tapkit-xen-vbd3-script-');
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const serve = startTapkit(t, ['xen', 'serve', '--platform', `sim:${dir}`, '--backend-type', 'vbd3']);
  await until('serving', () => serve.output().includes('serving'), serve.output);
  const script = path.join(__dirname, '..', '..', 'examples', 'xen', 'vbd3-attach');
  const env = { ...process.env, XENSTORED_PATH: path.join(dir, 'xenstored.sock') };
  await run(script, ['3', String(DEVID), 'memory:16M'], { env, timeout: 30_000 });
  const perms = (await xs(dir, 'xenstore-ls', '-p', '/local/domain')).stdout;
  t.regex(perms, /^\s*51712 = ""[ .]+\(n0,r3\)$/m, perms);
  t.regex(perms, /^\s*51712 = ""[ .]+\(n3,r0\)$/m, perms);
  await until('InitWait', async () => (await read(dir, `/local/domain/0/backend/vbd3/3/${DEVID}/state`)) === '2', serve.output);
  const rw = await runFrontend(dir, 3, DEVID, ['rw', '--seed', '3']);
  t.is(rw.code, 0, rw.stdout + rw.stderr + serve.output());
  await t.throwsAsync(run(script, ['3', String(DEVID), 'memory:16M'], { env, timeout: 30_000 }), { message: /exists/ });
});
