/**
 * The FUSE export against the real kernel, as root: `tapkit mount --loop`, then real
 * tools on the loop device (mkfs.ext4, mount, fsck.ext4, fio, losetup, dd), then
 * `tapkit unmount`, and the image reopened and compared with what the loop device held.
 */
import test, { type ExecutionContext } from 'ava';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import 'reflect-metadata';
import '../providers';
import { Opener } from '../core/open';
import { Vbd } from '../core/vbd';
import { loopsBackedBy } from '../core/fuse/loop';
import * as libc from '../native/libc';
import { isMounted, mountExt4, serve, sha256, sha256Of, type Served } from './fuse-helpers';
import { must, run, tapkit } from './helpers/run';
import { tempDir } from './helpers/temp';

const DISK = '256M';

interface ImageCase {
  name: string;
  /** Makes the image (with the real tool); returns the spec tapkit mounts and its size. */
  create(t: ExecutionContext, dir: string): Promise<{ spec: string; size: number }>;
  /** For images that outlive the server: the image's content as a raw file, by qemu-img. */
  qemuToRaw?(t: ExecutionContext, dir: string): Promise<string>;
}

/** An image made by `qemu-img create -f FORMAT`, mounted as `SPECNAME:path`. */
function qemuImage(name: string, qemuFormat: string, specName: string): ImageCase {
  const image = (dir: string) => path.join(dir, `disk.${name}`);
  return {
    name,
    create: async (t, dir) => {
      await must('qemu-img', ['create', '-q', '-f', qemuFormat, image(dir), DISK]);
      // The virtual size as qemu sees it (VHD rounds up to its CHS geometry).
      const info = JSON.parse(await must('qemu-img', ['info', '--output=json', '-f', qemuFormat, image(dir)])) as { 'virtual-size': number };
      return { spec: `${specName}:${image(dir)}`, size: info['virtual-size'] };
    },
    qemuToRaw: async (t, dir) => {
      const out = path.join(dir, `${name}-qemu.raw`);
      await must('qemu-img', ['convert', '-f', qemuFormat, '-O', 'raw', image(dir), out], { timeoutMs: 300_000 });
      return out;
    },
  };
}

/** Every disk the ext4 round trip runs on. Another format is one more line here. */
const CASES: ImageCase[] = [
  { name: 'memory', create: async () => ({ spec: `memory:${DISK}`, size: 256 * 2 ** 20 }) },
  qemuImage('raw', 'raw', 'raw'),
  qemuImage('vhd', 'vpc', 'vhd'),
];

function gone(t: ExecutionContext, served: Served): void {
  t.false(isMounted(served.mountpoint), 'the FUSE mount is gone');
  t.deepEqual(loopsBackedBy({ under: served.mountpoint }), [], 'no loop device is left on the file');
}

for (const c of CASES) {
  test.serial(`${c.name}: ext4 on the loop device survives write, remount, fsck, unmount and reopen`, async (t) => {
    const dir = tempDir(t, `tapkit-fuse-${c.name}-`);
    const { spec, size } = await c.create(t, dir);
    const served = await serve(t, spec, ['--loop'], dir);
    t.true(served.file.endsWith('/mnt/disk'));
    t.regex(served.device!, /^\/dev\/loop\d+$/);
    t.is(fs.statSync(served.file).size, size);
    t.is(fs.readFileSync(`/sys/block/${path.basename(served.device!)}/loop/dio`, 'utf8').trim(), '1', 'the loop device does direct I/O on the file');

    await must('mkfs.ext4', ['-q', '-F', served.device!], { timeoutMs: 180_000 });
    const ext4 = await mountExt4(t, served.device!, dir);
    const files = new Map<string, string>();
    for (const [i, size] of [1, 3, 2, 8].entries()) {
      const data = randomBytes(size * 2 ** 20 + i * 777);
      const name = `file${i}.bin`;
      fs.writeFileSync(path.join(ext4.path, name), data);
      files.set(name, sha256(data));
    }
    await must('sync', []);
    await ext4.unmount();

    // Read back from a fresh mount, so nothing comes from the page cache of the first one.
    const again = await mountExt4(t, served.device!, dir);
    for (const [name, digest] of files) t.is(sha256(fs.readFileSync(path.join(again.path, name))), digest, name);
    await again.unmount();
    const fsck = await run('fsck.ext4', ['-fn', served.device!], { timeoutMs: 180_000 });
    t.is(fsck.code, 0, `fsck.ext4 -fn: ${fsck.stdout}${fsck.stderr}`);

    const held = await sha256Of(served.device!, true);
    t.is(await sha256Of(served.file), held, 'the file and the loop device hold the same bytes');

    const unmounted = await tapkit(['unmount', served.mountpoint]);
    t.is(unmounted.code, 0, unmounted.stderr);
    const exit = await served.exit;
    t.is(exit.code, 0, served.stderr());
    gone(t, served);

    if (c.qemuToRaw) {
      t.is(await sha256Of(await c.qemuToRaw(t, dir)), held, 'qemu-img reads what the loop device held');
      const ours = path.join(dir, 'tapkit.raw');
      const converted = await tapkit(['convert', spec, ours], { timeoutMs: 300_000 });
      t.is(converted.code, 0, converted.stderr);
      t.is(await sha256Of(ours), held, 'tapkit reopens the image with what the loop device held');
    }
  });
}

test.serial('fio --verify=crc32c: mixed random I/O on the loop device reads back what it wrote', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-fio-');
  const served = await serve(t, 'memory:512M', ['--loop'], dir);
  // fio saves its verify state in the working directory: keep it in the test's.
  const fio = (args: string[]) => run('fio', args, { timeoutMs: 300_000, cwd: dir });
  const common = ['--name=verify', `--filename=${served.device}`, '--ioengine=libaio', '--direct=1', '--iodepth=16', '--size=320M', '--verify=crc32c', '--verify_fatal=1', '--randrepeat=0', '--output-format=terse'];
  // Random writes of mixed sizes over 320 MiB, then every block read back and checked.
  const write = await fio([...common, '--rw=randwrite', '--bssplit=4k/40:16k/25:64k/20:1m/15', '--norandommap=0']);
  t.is(write.code, 0, `fio randwrite+verify: ${write.stderr}`);
  // Mixed reads and writes, each write verified by a read of the same block.
  const mixed = await fio([...common, '--rw=randrw', '--rwmixread=50', '--bs=8k', '--io_size=64M', '--verify_backlog=32']);
  t.is(mixed.code, 0, `fio randrw+verify: ${mixed.stderr}`);
  const unmounted = await tapkit(['unmount', served.mountpoint]);
  t.is(unmounted.code, 0, unmounted.stderr);
  gone(t, served);
});

test.serial('a small UV_THREADPOOL_SIZE inherited from the caller (an xl hotplug script) is raised: the loop device over a raw file serves reads', async (t) => {
  const dir = tempDir(t, 'fuse-pool-');
  const image = path.join(dir, 'disk.raw');
  const content = randomBytes(8 << 20);
  fs.writeFileSync(image, content);
  // With 4 threads every one would wait on /dev/fuse and the raw file's reads (on the
  // same pool) would never run: the mount must raise the pool, not hang or refuse.
  const served = await serve(t, `raw:${image}`, ['--loop'], dir, { UV_THREADPOOL_SIZE: '4' });
  t.is(await sha256Of(served.device!, true), sha256(content), 'the loop device reads the file through the FUSE export');
  const unmounted = await tapkit(['unmount', served.mountpoint]);
  t.is(unmounted.code, 0, unmounted.stderr);
  gone(t, served);
});

test.serial('SIGKILL of the server during I/O: the I/O fails, nothing hangs, and tapkit unmount recovers', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-kill-');
  const served = await serve(t, 'memory:256M', ['--loop'], dir);
  const io = run('fio', ['--name=busy', `--filename=${served.device}`, '--ioengine=libaio', '--direct=1', '--iodepth=8', '--rw=randrw', '--bs=64k', '--time_based', '--runtime=120', '--size=256M'], { timeoutMs: 90_000, cwd: dir });
  await new Promise((r) => setTimeout(r, 2000));
  served.proc.kill('SIGKILL');
  await served.exit;
  const result = await io;
  t.is(result.signal, null, 'fio ended by itself (it did not hang until the timeout)');
  t.not(result.code, 0, 'the I/O failed');
  t.regex(result.stderr + result.stdout, /error|err=/i);
  // Any new access fails at once too.
  const dd = await run('dd', [`if=${served.device}`, 'of=/dev/null', 'bs=4k', 'count=1', 'iflag=direct'], { timeoutMs: 30_000 });
  t.is(dd.signal, null);
  t.not(dd.code, 0);

  t.true(isMounted(served.mountpoint), 'the dead mount is still there before tapkit unmount');
  const unmounted = await tapkit(['unmount', served.mountpoint]);
  t.is(unmounted.code, 0, unmounted.stderr);
  gone(t, served);
});

test.serial('a read-only mount refuses writes to the file and to the loop device', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-ro-');
  const image = path.join(dir, 'disk.raw');
  fs.writeFileSync(image, randomBytes(4 * 2 ** 20));
  const before = sha256(fs.readFileSync(image));
  const served = await serve(t, `raw:${image}`, ['--read-only', '--loop', '--name', 'ro.img'], dir);
  t.is(path.basename(served.file), 'ro.img');
  const err = t.throws(() => fs.openSync(served.file, 'r+')) as NodeJS.ErrnoException;
  t.true(['EROFS', 'EPERM', 'EACCES'].includes(err.code!), err.code);
  const dd = await run('dd', ['if=/dev/zero', `of=${served.device}`, 'bs=4k', 'count=1', 'oflag=direct'], { timeoutMs: 30_000 });
  t.not(dd.code, 0);
  t.regex(dd.stderr, /Read-only file system|Operation not permitted|Permission denied/);
  t.is(await sha256Of(served.device!, true), before, 'reads still work');
  const unmounted = await tapkit(['unmount', served.mountpoint]);
  t.is(unmounted.code, 0, unmounted.stderr);
  t.is(sha256(fs.readFileSync(image)), before, 'the image is unchanged');
});

test.serial('lseek SEEK_DATA/SEEK_HOLE on the file matches the extents; truncate is refused; fallocate punches', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-seek-');
  const image = path.join(dir, 'sparse.raw');
  const MiB = 2 ** 20;
  const fd = fs.openSync(image, 'w');
  fs.ftruncateSync(fd, 64 * MiB);
  fs.writeSync(fd, randomBytes(64 * 1024), 0, 64 * 1024, 1 * MiB);
  fs.writeSync(fd, randomBytes(4096), 0, 4096, 40 * MiB);
  fs.writeSync(fd, randomBytes(8192), 0, 8192, 64 * MiB - 8192);
  fs.closeSync(fd);
  const served = await serve(t, `raw:${image}`, [], dir);

  // What tapkit's own VBD says about the image, opened here independently.
  const vbd = new Vbd(await new Opener({ readOnly: true }).open(`raw:${image}`));
  const extents = await vbd.extents(0, vbd.info().size);
  await vbd.close();
  t.true(extents.filter((e) => e.type === 'data').length >= 3);

  const file = fs.openSync(served.file, 'r+');
  let open = true;
  t.teardown(() => {
    if (open) fs.closeSync(file);
  });
  // Walk the file with SEEK_DATA/SEEK_HOLE and rebuild the data runs.
  const seen: Array<[number, number]> = [];
  for (let at = 0; ; ) {
    const data = libc.seekData(file, at, libc.SEEK_DATA);
    if (data < 0) break;
    const hole = libc.seekData(file, data, libc.SEEK_HOLE);
    seen.push([data, hole]);
    at = hole;
    if (at >= 64 * MiB) break;
  }
  t.deepEqual(seen, extents.filter((e) => e.type === 'data').map((e) => [e.offset, e.offset + e.length]));
  t.is(libc.seekData(file, 64 * MiB - 1, libc.SEEK_HOLE), 64 * MiB, 'the end of the file is a hole');

  // The disk cannot change size.
  const truncate = await run('truncate', ['-s', '1M', served.file], { timeoutMs: 30_000 });
  t.not(truncate.code, 0);
  t.regex(truncate.stderr, /Operation not permitted|Invalid argument/);
  t.is(fs.statSync(served.file).size, 64 * MiB);
  const grow = t.throws(() => fs.writeSync(file, Buffer.alloc(4096, 1), 0, 4096, 64 * MiB)) as NodeJS.ErrnoException;
  t.is(grow.code, 'EFBIG');

  // Punching a hole through the file reaches the image as a hole that reads as zeros.
  await must('fallocate', ['--punch-hole', '--offset', String(MiB), '--length', String(64 * 1024), served.file]);
  t.is(libc.seekData(file, 0, libc.SEEK_DATA), 40 * MiB);
  const back = Buffer.alloc(64 * 1024, 1);
  fs.readSync(file, back, 0, back.length, MiB);
  t.true(back.every((b) => b === 0));
  await must('fallocate', ['--zero-range', '--keep-size', '--offset', String(40 * MiB), '--length', '4096', served.file]);
  fs.readSync(file, back, 0, 4096, 40 * MiB);
  t.true(back.subarray(0, 4096).every((b) => b === 0));
  fs.closeSync(file);
  open = false;
  const unmounted = await tapkit(['unmount', served.mountpoint]);
  t.is(unmounted.code, 0, unmounted.stderr);
  const onDisk = fs.readFileSync(image);
  t.true(onDisk.subarray(MiB, MiB + 64 * 1024).every((b) => b === 0), 'the punched range is zero in the image');
});

test.serial('tapkit unmount refuses what is not a tapkit mount, and mount refuses a missing directory', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-misc-');
  const r = await tapkit(['unmount', dir]);
  t.is(r.code, 2);
  t.regex(r.stderr, /not a tapkit FUSE mount/);
  const m = await tapkit(['mount', 'memory:1M', path.join(dir, 'nope')]);
  t.is(m.code, 2);
  t.regex(m.stderr, /does not exist/);
});

test.serial('SIGTERM unmounts cleanly: the server detaches its loop device, flushes and unmounts', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-term-');
  const image = path.join(dir, 'disk.raw');
  fs.writeFileSync(image, Buffer.alloc(8 * 2 ** 20));
  const served = await serve(t, `raw:${image}`, ['--loop'], dir);
  const data = randomBytes(2 ** 20);
  fs.writeFileSync(served.device!, data);
  served.proc.kill('SIGTERM');
  const exit = await served.exit;
  t.is(exit.code, 0, served.stderr());
  gone(t, served);
  t.deepEqual(fs.readFileSync(image).subarray(0, data.length), data);
});

test.serial('SIGTERM while the loop device is still open (xen-blkback closing it a moment later): the server waits for the last close, then unmounts cleanly', async (t) => {
  const dir = tempDir(t, 'fuse-term-held-');
  const image = path.join(dir, 'disk.raw');
  fs.writeFileSync(image, Buffer.alloc(8 * 2 ** 20));
  const served = await serve(t, `raw:${image}`, ['--loop'], dir);
  // A user of the block device that lets go 3 s after the stop begins.
  const holder = run('bash', ['-c', 'exec 3<"$1"; echo open; sleep 3', 'hold', served.device!], { timeoutMs: 60_000 });
  await new Promise((r) => setTimeout(r, 1000));
  served.proc.kill('SIGTERM');
  const exit = await served.exit;
  t.is((await holder).code, 0);
  t.is(exit.code, 0, served.stderr());
  t.notRegex(served.stderr(), /aborting/);
  gone(t, served);
});

test.serial('a stopped (hung) server does not hang tapkit unmount: it aborts the connection and cleans up', async (t) => {
  const served = await serve(t, 'memory:64M', ['--loop']);
  t.teardown(() => {
    if (served.proc.exitCode === null) served.proc.kill('SIGCONT');
  });
  served.proc.kill('SIGSTOP');
  const unmounted = await tapkit(['unmount', served.mountpoint], { timeoutMs: 90_000 });
  t.is(unmounted.signal, null, 'tapkit unmount finished by itself');
  t.is(unmounted.code, 0, unmounted.stderr);
  t.regex(unmounted.stderr, /aborting the FUSE connection/);
  gone(t, served);
  // Once it runs again, the server finds its connection gone and leaves.
  served.proc.kill('SIGCONT');
  const exit = await Promise.race([served.exit, new Promise<'hung'>((r) => setTimeout(() => r('hung'), 30_000))]);
  t.not(exit, 'hung');
});

test.serial('tapkit unmount refuses while a file system is mounted on the loop device, and succeeds after', async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-busy-');
  const served = await serve(t, 'memory:64M', ['--loop'], dir);
  await must('mkfs.ext4', ['-q', '-F', served.device!], { timeoutMs: 120_000 });
  const ext4 = await mountExt4(t, served.device!, dir);
  fs.writeFileSync(path.join(ext4.path, 'kept'), 'still here');
  const refused = await tapkit(['unmount', served.mountpoint]);
  t.is(refused.code, 1);
  t.regex(refused.stderr, /still in use/);
  t.true(isMounted(served.mountpoint), 'the FUSE mount stays');
  t.is(fs.readFileSync(path.join(ext4.path, 'kept'), 'utf8'), 'still here', 'the file system keeps working');
  await ext4.unmount();
  const unmounted = await tapkit(['unmount', served.mountpoint]);
  t.is(unmounted.code, 0, unmounted.stderr);
  gone(t, served);
  t.is((await served.exit).code, 0);
});

test.serial("a provider's error reaches the writer through the kernel as its errno (ENOSPC), and the mount keeps serving", async (t) => {
  const dir = tempDir(t, 'tapkit-fuse-enospc-');
  const served = await serve(t, 'memory,limit=1M:16M', [], dir);
  const dd = await run('dd', ['if=/dev/urandom', `of=${served.file}`, 'bs=64k', 'count=64', 'conv=notrunc,fsync', 'status=none'], { timeoutMs: 60_000 });
  t.not(dd.code, 0);
  t.regex(dd.stderr, /No space left on device/);
  // Reading is still fine, and so is writing over what is already allocated.
  const again = await run('dd', ['if=/dev/zero', `of=${served.file}`, 'bs=64k', 'count=4', 'conv=notrunc,fsync', 'status=none'], { timeoutMs: 60_000 });
  t.is(again.code, 0, again.stderr);
  t.is(fs.readFileSync(served.file).length, 16 * 2 ** 20);
  const unmounted = await tapkit(['unmount', served.mountpoint]);
  t.is(unmounted.code, 0, unmounted.stderr);
  t.is((await served.exit).code, 0, served.stderr());
});

test.serial('--allow-other lets another user read the file (permissions still apply); without it the kernel refuses them', async (t) => {
  const asNobody = (args: string[]) => run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', ...args], { timeoutMs: 30_000 });
  for (const allowOther of [false, true]) {
    const dir = tempDir(t, 'tapkit-fuse-other-');
    fs.chmodSync(dir, 0o755); // let the other user reach the mount point
    const served = await serve(t, 'memory:4M', allowOther ? ['--allow-other'] : [], dir);
    const read = await asNobody(['dd', `if=${served.file}`, 'of=/dev/null', 'bs=4k', 'count=1', 'status=none']);
    const write = await asNobody(['dd', 'if=/dev/zero', `of=${served.file}`, 'bs=4k', 'count=1', 'conv=notrunc', 'status=none']);
    if (allowOther) {
      t.is(read.code, 0, `read as nobody: ${read.stderr}`);
      t.not(write.code, 0, 'the file is 0644 and owned by root');
    } else {
      t.not(read.code, 0, 'without allow_other only the mounting user gets in');
      t.not(write.code, 0);
    }
    t.regex(allowOther ? write.stderr : read.stderr, /Permission denied/);
    const unmounted = await tapkit(['unmount', served.mountpoint]);
    t.is(unmounted.code, 0, unmounted.stderr);
  }
});

test.serial('with a plugin loaded, tapkit mount still has threads for its readers and the file reads', async (t) => {
  // Loading a plugin (an ES module import) starts libuv's pool; tapkit mount must have
  // sized it first, or its 8 waiting reads of /dev/fuse would take every thread.
  const plugin = path.join(__dirname, '..', 'examples', 'pattern.js');
  const served = await serve(t, 'pattern:16M', ['--read-only', '--plugin', plugin]);
  const read = await run('dd', [`if=${served.file}`, 'of=/dev/null', 'bs=1M', 'status=none'], { timeoutMs: 30_000 });
  t.is(read.signal, null, 'the read did not hang');
  t.is(read.code, 0, read.stderr);
  t.true(fs.readdirSync(`/proc/${served.proc.pid}/task`).length > 16);
  const unmounted = await tapkit(['unmount', served.mountpoint]);
  t.is(unmounted.code, 0, unmounted.stderr);
});
