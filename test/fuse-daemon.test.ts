/**
 * The daemon's `fuse:` export kind against the real kernel, as root: a `tapkit daemon`
 * child, devices created and destroyed with `tapkit ctl`, data written through the loop
 * device and the file with dd, and read back from the image and from the other path.
 */
import test, { type ExecutionContext } from 'ava';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { CLI, startDaemon, type RunningDaemon } from './helpers/daemon';
import type { DeviceStats, DeviceSummary } from '../core/daemon/devices';
import { loopsBackedBy } from '../core/fuse/loop';
import { parseFuseArgument } from '../core/fuse/daemon-export';
import { cleanupMount, isMounted, mountExt4, sha256 } from './fuse-helpers';
import { must, run, tapkit } from './helpers/run';
import { tempDir } from './helpers/temp';

const MiB = 2 ** 20;

function ctl(daemon: RunningDaemon, ...args: string[]) {
  return run(process.execPath, [CLI, 'ctl', '--control', daemon.control, ...args], { timeoutMs: 120_000 });
}

/** A daemon whose mounts are cleaned up whatever happens to the test. */
async function daemonFor(t: ExecutionContext, mountpoints: string[], env: Record<string, string> = {}): Promise<RunningDaemon> {
  const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
  Object.assign(process.env, env);
  let daemon: RunningDaemon;
  try {
    daemon = await startDaemon();
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
  t.teardown(async () => {
    await daemon.stop();
    for (const mountpoint of mountpoints) await cleanupMount(mountpoint, daemon.child, Promise.resolve());
  });
  return daemon;
}

function gone(t: ExecutionContext, mountpoint: string): void {
  t.false(isMounted(mountpoint), `${mountpoint} is unmounted`);
  t.deepEqual(loopsBackedBy({ under: mountpoint }), [], 'no loop device is left on the file');
}

test('parseFuseArgument: mount point, loop, name, allow-other; anything else is refused', (t) => {
  t.deepEqual(parseFuseArgument('/mnt/a,loop,name=vm1.img,allow-other'), { mountpoint: '/mnt/a', loop: true, name: 'vm1.img', allowOther: true });
  t.deepEqual(parseFuseArgument('/mnt/a'), { mountpoint: '/mnt/a', loop: false, allowOther: false });
  t.throws(() => parseFuseArgument(''), { message: /needs a mount point/ });
  t.throws(() => parseFuseArgument('/mnt/a,lop'), { message: /unknown fuse export option 'lop'/ });
  t.throws(() => parseFuseArgument('/mnt/a,name='), { message: /unknown fuse export option 'name='/ });
});

test.serial('ctl create --export fuse:MNT,loop: writes through the loop device and the file reach the image; destroy cleans up', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-daemon-');
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const image = path.join(dir, 'disk.raw');
  await must('qemu-img', ['create', '-q', '-f', 'raw', image, '32M']);
  const daemon = await daemonFor(t, [mnt]);

  const created = await ctl(daemon, 'create', `raw:${image}`, '--name', 'vm1', '--export', `fuse:${mnt},loop`);
  t.is(created.code, 0, created.stderr);
  const id = created.stdout.trim();
  const [device] = JSON.parse((await ctl(daemon, 'list', '--json')).stdout) as DeviceSummary[];
  t.is(device.id, id);
  t.is(device.exports.length, 1);
  const fuse = device.exports[0];
  t.is(fuse.kind, 'fuse');
  t.is(fuse.target, path.join(mnt, 'disk'));
  t.regex(fuse.device!, /^\/dev\/loop\d+$/);
  t.true(isMounted(mnt));
  t.deepEqual(loopsBackedBy({ under: mnt }).map((l) => l.device), [fuse.device]);
  t.regex((await ctl(daemon, 'list')).stdout, new RegExp(`fuse:${fuse.target} \\(${fuse.device}\\)`));

  // examples/daemon/block-tapkit picks the loop device out of `ctl list --json` with an
  // inline node program; run that very program on this daemon's answer.
  const script = fs.readFileSync(path.join(__dirname, '..', '..', 'examples', 'daemon', 'block-tapkit'), 'utf8');
  const picker = /node -e '([\s\S]*?)' "\$id"/.exec(script);
  t.truthy(picker, 'block-tapkit still has its node -e picker');
  const picked = await must('bash', ['-c', `"$1" ${CLI} ctl --control "$2" list --json | "$1" -e "$3" "$4"`, 'pick', process.execPath, daemon.control, picker![1], id], { timeoutMs: 30_000 });
  t.is(picked, fuse.device!, 'block-tapkit would hand this loop device to blkback');

  // One MiB through the loop device (direct I/O, past the page cache), one through the file.
  const viaLoop = randomBytes(MiB);
  const viaFile = randomBytes(MiB);
  const input = path.join(dir, 'in');
  fs.writeFileSync(input, viaLoop);
  await must('dd', [`if=${input}`, `of=${fuse.device}`, 'bs=64k', `seek=${4 * MiB}`, 'oflag=direct,seek_bytes', 'conv=notrunc', 'status=none'], { timeoutMs: 60_000 });
  fs.writeFileSync(input, viaFile);
  await must('dd', [`if=${input}`, `of=${fuse.target}`, 'bs=64k', `seek=${8 * MiB}`, 'oflag=seek_bytes', 'conv=notrunc,fsync', 'status=none'], { timeoutMs: 60_000 });
  // Each path sees what the other wrote.
  const fromFile = Buffer.alloc(MiB);
  const fd = fs.openSync(fuse.target, 'r');
  fs.readSync(fd, fromFile, 0, MiB, 4 * MiB);
  fs.closeSync(fd);
  t.is(sha256(fromFile), sha256(viaLoop), 'the file shows what the loop device wrote');
  const fromLoop = await must('bash', ['-c', `set -o pipefail; dd if="$1" bs=1M skip=8 count=1 iflag=direct status=none | sha256sum`, 'hash', fuse.device!], { timeoutMs: 60_000 });
  t.is(fromLoop.split(' ')[0], sha256(viaFile), 'the loop device shows what the file wrote');

  const stats = JSON.parse((await ctl(daemon, 'stats', id, '--json')).stdout) as DeviceStats;
  t.true(stats.operations.write.bytes >= 2 * MiB, 'the writes went through the device');
  t.like(stats.exports[0].stats, { mountpoint: mnt, loop: fuse.device });

  // The daemon owns the mount: tapkit unmount points at ctl destroy and leaves it alone.
  const refused = await tapkit(['unmount', mnt]);
  t.is(refused.code, 2);
  t.regex(refused.stderr, new RegExp(`tapkit ctl destroy ${id}`));
  t.true(isMounted(mnt));

  const destroyed = await ctl(daemon, 'destroy', id);
  t.is(destroyed.code, 0, destroyed.stderr);
  gone(t, mnt);
  t.deepEqual(JSON.parse((await ctl(daemon, 'list', '--json')).stdout), []);
  const onDisk = fs.readFileSync(image);
  t.is(sha256(onDisk.subarray(4 * MiB, 5 * MiB)), sha256(viaLoop), 'the loop device write is in the image');
  t.is(sha256(onDisk.subarray(8 * MiB, 9 * MiB)), sha256(viaFile), 'the file write is in the image');
  t.notRegex(daemon.log(), /"level":"error"/);
});

test.serial('a bad fuse export fails the create and leaves no device, mount or loop device', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-daemon-bad-');
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const daemon = await daemonFor(t, [mnt]);
  const unknown = await ctl(daemon, 'create', 'memory:8M', '--export', `fuse:${mnt},lop`);
  t.is(unknown.code, 1);
  t.regex(unknown.stderr, /unknown fuse export option 'lop'/);
  const missing = await ctl(daemon, 'create', 'memory:8M', '--export', `fuse:${path.join(dir, 'nope')},loop`);
  t.is(missing.code, 1);
  t.regex(missing.stderr, /nope/);
  // A mount point this daemon already serves is refused without touching it (a stat of
  // its own mount would wait on itself), and the first device keeps serving.
  const first = await ctl(daemon, 'create', 'memory:8M', '--export', `fuse:${mnt}`);
  t.is(first.code, 0, first.stderr);
  const twice = await ctl(daemon, 'create', 'memory:8M', '--export', `fuse:${mnt}`);
  t.is(twice.code, 1);
  t.regex(twice.stderr, /already a FUSE mount/);
  t.is(fs.statSync(path.join(mnt, 'disk')).size, 8 * MiB);
  t.is((await ctl(daemon, 'destroy', first.stdout.trim())).code, 0);
  // The second export fails after the first mounted: the first is taken down again.
  const second = path.join(dir, 'second');
  const half = await ctl(daemon, 'create', 'memory:8M', '--export', `fuse:${mnt},loop`, '--export', `fuse:${second}`);
  t.is(half.code, 1);
  gone(t, mnt);
  t.deepEqual(JSON.parse((await ctl(daemon, 'list', '--json')).stdout), []);
  t.true((await daemon.call({ op: 'ping' })).ok);
});

test.serial('a thread pool inherited too small for one mount (UV_THREADPOOL_SIZE=2, as from a hotplug script) is raised: the daemon serves a mount', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-daemon-smallpool-');
  const mnt = path.join(dir, 'm');
  fs.mkdirSync(mnt);
  const daemon = await daemonFor(t, [mnt], { UV_THREADPOOL_SIZE: '2' });
  const r = await ctl(daemon, 'create', 'memory:8M', '--export', `fuse:${mnt}`);
  t.is(r.code, 0, r.stderr);
  await must('dd', ['if=/dev/zero', `of=${path.join(mnt, 'disk')}`, 'bs=1M', 'count=2', 'conv=notrunc,fsync', 'status=none'], { timeoutMs: 60_000 });
  t.true(isMounted(mnt));
});

test.serial('mounts share the thread pool: one that would starve it is refused, and fits again once another is destroyed', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-daemon-pool-');
  const mnts = ['a', 'b', 'c'].map((n) => path.join(dir, n));
  for (const m of mnts) fs.mkdirSync(m);
  // 12 threads: 4 kept free, 4 readers per mount, so two mounts fit.
  const daemon = await daemonFor(t, mnts, { UV_THREADPOOL_SIZE: '12' });
  const ids: string[] = [];
  for (const m of mnts.slice(0, 2)) {
    const r = await ctl(daemon, 'create', 'memory:8M', '--export', `fuse:${m}`);
    t.is(r.code, 0, r.stderr);
    ids.push(r.stdout.trim());
  }
  const third = await ctl(daemon, 'create', 'memory:8M', '--export', `fuse:${mnts[2]}`);
  t.is(third.code, 1);
  t.regex(third.stderr, /no room for another FUSE mount.*UV_THREADPOOL_SIZE/);
  t.false(isMounted(mnts[2]));
  // Both mounts serve I/O at once.
  await Promise.all(mnts.slice(0, 2).map((m) => must('dd', ['if=/dev/urandom', `of=${path.join(m, 'disk')}`, 'bs=1M', 'count=8', 'conv=notrunc,fsync', 'status=none'], { timeoutMs: 60_000 })));
  t.is((await ctl(daemon, 'destroy', ids[0])).code, 0);
  const again = await ctl(daemon, 'create', 'memory:8M', '--export', `fuse:${mnts[2]}`);
  t.is(again.code, 0, again.stderr);
  t.true(isMounted(mnts[2]));
});

test.serial('SIGTERM to the daemon detaches, flushes and unmounts its FUSE exports', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-daemon-term-');
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const image = path.join(dir, 'disk.raw');
  fs.writeFileSync(image, Buffer.alloc(8 * MiB));
  const daemon = await daemonFor(t, [mnt]);
  await daemon.ok({ op: 'create', spec: `raw:${image}`, exports: [`fuse:${mnt},loop,name=vm.img`] });
  const [device] = await daemon.ok<DeviceSummary[]>({ op: 'list' });
  t.is(device.exports[0].target, path.join(mnt, 'vm.img'));
  const data = randomBytes(MiB);
  fs.writeFileSync(device.exports[0].device!, data);
  t.is(await daemon.stop('SIGTERM'), 0);
  gone(t, mnt);
  t.deepEqual(fs.readFileSync(image).subarray(0, MiB), data);
});

test.serial('SIGKILL of the daemon: users of the mount get errors, and tapkit unmount cleans up', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-daemon-kill-');
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const daemon = await daemonFor(t, [mnt]);
  await daemon.ok({ op: 'create', spec: 'memory:32M', exports: [`fuse:${mnt},loop`] });
  const [device] = await daemon.ok<DeviceSummary[]>({ op: 'list' });
  const loop = device.exports[0].device!;
  daemon.child.kill('SIGKILL');
  await new Promise((r) => (daemon.child.exitCode !== null || daemon.child.signalCode !== null ? r(null) : daemon.child.once('exit', r)));
  const dd = await run('dd', [`if=${loop}`, 'of=/dev/null', 'bs=4k', 'count=1', 'iflag=direct'], { timeoutMs: 30_000 });
  t.is(dd.signal, null, 'dd did not hang');
  t.not(dd.code, 0);
  t.true(isMounted(mnt), 'the dead mount is there until tapkit unmount');
  const unmounted = await tapkit(['unmount', mnt], { timeoutMs: 90_000 });
  t.is(unmounted.code, 0, unmounted.stderr);
  gone(t, mnt);
});

test.serial('the daemon sizes the thread pool before plugins load, so a plugin does not shrink the room for mounts', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-daemon-plugin-');
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const plugin = path.join(__dirname, '..', 'examples', 'pattern.js');
  const daemon = await startDaemon(['--plugin', plugin]);
  t.teardown(async () => {
    await daemon.stop();
    await cleanupMount(mnt, daemon.child, Promise.resolve());
  });
  await daemon.ok({ op: 'create', spec: 'pattern:16M', readOnly: true, exports: [`fuse:${mnt}`] });
  const read = await run('dd', [`if=${path.join(mnt, 'disk')}`, 'of=/dev/null', 'bs=1M', 'status=none'], { timeoutMs: 30_000 });
  t.is(read.code, 0, read.stderr);
  // A read-only device makes a read-only mount.
  const write = await run('dd', ['if=/dev/zero', `of=${path.join(mnt, 'disk')}`, 'bs=4k', 'count=1', 'conv=notrunc', 'status=none'], { timeoutMs: 30_000 });
  t.not(write.code, 0);
  t.regex(write.stderr, /Read-only file system/);
  // libuv starts every pool thread at once: the daemon's threads number more than 128.
  t.true(fs.readdirSync(`/proc/${daemon.child.pid}/task`).length > 128);
});

test.serial('destroying a paused device unmounts at once; what was written before the pause is in the image', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-daemon-paused-');
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const image = path.join(dir, 'disk.raw');
  fs.writeFileSync(image, Buffer.alloc(4 * MiB));
  const daemon = await daemonFor(t, [mnt]);
  const { id } = await daemon.ok<DeviceSummary>({ op: 'create', spec: `raw:${image}`, exports: [`fuse:${mnt},loop`] });
  const [device] = await daemon.ok<DeviceSummary[]>({ op: 'list' });
  const data = randomBytes(MiB);
  fs.writeFileSync(device.exports[0].device!, data);
  await daemon.ok({ op: 'pause', device: id });
  const destroyed = await ctl(daemon, 'destroy', id);
  t.is(destroyed.code, 0, destroyed.stderr);
  t.notRegex(daemon.log(), /flush before unmount failed/, 'the export did not wait on a flush the pause holds');
  gone(t, mnt);
  t.deepEqual(fs.readFileSync(image).subarray(0, MiB), data);
});

test.serial('a mount unmounted behind the daemon\'s back is reported (stats, log) and the device still destroys cleanly', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-daemon-umount-');
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const daemon = await daemonFor(t, [mnt]);
  const { id } = await daemon.ok<DeviceSummary>({ op: 'create', spec: 'memory:8M', exports: [`fuse:${mnt}`] });
  t.like((await daemon.ok<DeviceStats>({ op: 'stats', device: id })).exports[0].stats, { mounted: true });
  await must('umount', [mnt], { timeoutMs: 30_000 });
  let stats: DeviceStats | undefined;
  for (let i = 0; i < 100; i++) {
    stats = await daemon.ok<DeviceStats>({ op: 'stats', device: id });
    if (stats.exports[0].stats?.mounted === false) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  t.like(stats!.exports[0].stats, { mounted: false });
  t.regex(daemon.log(), /the FUSE mount went away/);
  const destroyed = await ctl(daemon, 'destroy', id);
  t.is(destroyed.code, 0, destroyed.stderr);
  t.false(isMounted(mnt));
});

test.serial('destroy while a file system on the loop device is mounted: aborted, not hung; tapkit unmount cleans up after', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-daemon-busy-');
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const daemon = await daemonFor(t, [mnt]);
  const { id } = await daemon.ok<DeviceSummary>({ op: 'create', spec: 'memory:64M', exports: [`fuse:${mnt},loop`] });
  const loop = (await daemon.ok<DeviceSummary[]>({ op: 'list' }))[0].exports[0].device!;
  await must('mkfs.ext4', ['-q', '-F', loop], { timeoutMs: 120_000 });
  const ext4 = await mountExt4(t, loop, dir);
  const destroyed = await ctl(daemon, 'destroy', id);
  t.is(destroyed.code, 1, 'the export that could not close cleanly is reported');
  t.regex(destroyed.stderr, new RegExp(`^[^\n]*device ${id} was destroyed, but its fuse export \\S+ failed to close: ${mnt} was still in use[^\n]*\n$`), 'one line naming the device, the export and why');
  t.regex(daemon.log(), /still in use; aborting its FUSE connection/);
  t.deepEqual(await daemon.ok({ op: 'list' }), [], 'the device is gone from the daemon either way');
  // The file system's I/O now fails instead of waiting on a server that left.
  const write = await run('dd', ['if=/dev/zero', `of=${path.join(ext4.path, 'late')}`, 'bs=64k', 'count=16', 'oflag=direct', 'status=none'], { timeoutMs: 60_000 });
  t.is(write.signal, null, 'dd did not hang');
  t.not(write.code, 0);
  await run('umount', ['-l', ext4.path], { timeoutMs: 30_000 });
  const unmounted = await tapkit(['unmount', mnt], { timeoutMs: 90_000 });
  t.is(unmounted.code, 0, unmounted.stderr);
  gone(t, mnt);
  t.true((await daemon.call({ op: 'ping' })).ok);
});
