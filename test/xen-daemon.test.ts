/**
 * The daemon's `xen` export on the sim platform: `tapkit daemon` serves the platform's
 * sockets itself, a device with `xen:DOMID/DEVID,platform=sim:DIR,attach` is driven by
 * the C frontend (libxenstore, ring.h), a second device serves nodes that `tapkit xen
 * attach` wrote, and destroy detaches, leaving the other device serving.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { DeviceSummary } from '../core/daemon/devices';
import { CLI, startDaemon } from './helpers/daemon';
import { runFrontend } from './xen/harness';
import { mustRun } from './helpers/run';
import { tempDir } from './helpers/temp';

const DEVID = 51712;

function xs(dir: string, tool: string, ...args: string[]) {
  return mustRun(tool, args, { env: { ...process.env, XENSTORED_PATH: path.join(dir, 'xenstored.sock') }, timeoutMs: 10_000 });
}

test.serial('a daemon device exported as xen:DOMID/DEVID,platform=sim:DIR,attach serves the C frontend; destroy detaches', async (t) => {
  const daemon = await startDaemon();
  t.teardown(() => daemon.stop());
  const dir = tempDir(t, 'tapkit-xen-daemon-');
  const sim = `platform=sim:${dir}`;
  const a = await daemon.ok<DeviceSummary>({ op: 'create', spec: 'memory:64M', name: 'a', exports: [`xen:5/${DEVID},${sim},attach`] });
  t.deepEqual(a.exports, [{ kind: 'xen', target: `sim:${dir} /local/domain/0/backend/vbd/5/${DEVID}` }]);
  t.is((await xs(dir, 'xenstore-read', `/local/domain/0/backend/vbd/5/${DEVID}/state`)).stdout.trim(), '2', 'InitWait');

  const rw = await runFrontend(dir, 5, DEVID, ['rw', '--seed', '3']);
  t.is(rw.code, 0, rw.stdout + rw.stderr + daemon.log());
  t.regex(rw.stdout, /ok rw x86_64-abi/);

  // A second device on the same platform, its nodes written by the toolstack verb.
  const attached = await mustRun(process.execPath, [CLI, 'xen', 'attach', '--platform', `sim:${dir}`, '--domid', '6', '--devid', String(DEVID), 'ignored-params'], { timeoutMs: 20_000 });
  t.is(attached.stderr, '');
  const b = await daemon.ok<DeviceSummary>({ op: 'create', spec: 'memory:32M', name: 'b', exports: [`xen:6/${DEVID},${sim}`] });
  const indirect = await runFrontend(dir, 6, DEVID, ['indirect', '--seed', '4']);
  t.is(indirect.code, 0, indirect.stdout + indirect.stderr + daemon.log());

  const stats = await daemon.ok<{ exports: Array<{ stats: { requests: number; connections: number } }> }>({ op: 'stats', device: b.id });
  t.true(stats.exports[0].stats.requests >= 4, JSON.stringify(stats));
  t.is(stats.exports[0].stats.connections, 1);

  // Destroying a removes its vbd's nodes; b serves on through the same platform.
  await daemon.ok({ op: 'destroy', device: a.id });
  await t.throwsAsync(xs(dir, 'xenstore-read', `/local/domain/0/backend/vbd/5/${DEVID}/state`));
  await t.throwsAsync(xs(dir, 'xenstore-read', `/local/domain/5/device/vbd/${DEVID}/state`));
  const again = await runFrontend(dir, 6, DEVID, ['reconnect', '--seed', '8']);
  t.is(again.code, 0, again.stdout + again.stderr + daemon.log());

  // The last export gone, the platform's sockets go too; the vbd b served was not its to remove.
  await daemon.ok({ op: 'destroy', device: b.id });
  t.false(fs.existsSync(path.join(dir, 'xenstored.sock')));
  t.false(fs.existsSync(path.join(dir, 'evtchn.sock')));
});

test.serial('xen export arguments: malformed, an unknown platform, a vbd with no nodes, or one attached twice fail clearly and leave nothing behind', async (t) => {
  const daemon = await startDaemon();
  t.teardown(() => daemon.stop());
  const dir = tempDir(t, 'tapkit-xen-daemon-');
  const failure = async (exports: string[]) => {
    const r = await daemon.call({ op: 'create', spec: 'memory:1M', exports });
    t.false(r.ok);
    return r.ok ? '' : `${r.error.code} ${r.error.message}`;
  };
  t.regex(await failure(['xen:nonsense']), /EINVAL expected xen:DOMID\/DEVID/);
  t.regex(await failure(['xen:0/1,platform=sim:' + dir]), /EINVAL .*not a guest domain/);
  t.regex(await failure(['xen:5/1,platform=sim:' + dir + ',bogus']), /unknown option 'bogus'/);
  t.regex(await failure(['xen:5/1,platform=teleport:x']), /unknown platform 'teleport:x'/);
  t.regex(await failure([`xen:5/1,platform=sim:${dir}`]), /ENOENT .*no vbd at \/local\/domain\/0\/backend\/vbd\/5\/1/);
  t.false(fs.existsSync(path.join(dir, 'xenstored.sock')), 'a failed export released the platform');
  const ok = await daemon.ok<DeviceSummary>({ op: 'create', spec: 'memory:1M', exports: [`xen:5/1,platform=sim:${dir},attach`] });
  t.regex(await failure([`xen:5/1,platform=sim:${dir},attach`]), /EEXIST .*already exists/);
  t.deepEqual(
    (await daemon.ok<DeviceSummary[]>({ op: 'list' })).map((d) => d.id),
    [ok.id],
  );
  t.is((await xs(dir, 'xenstore-read', '/local/domain/0/backend/vbd/5/1/params')).stdout.trim(), `tapkit-device:${ok.id}`);
});
