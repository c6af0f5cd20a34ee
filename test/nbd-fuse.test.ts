/**
 * A 64 MiB export carried through nbdfuse + losetup into an ext4 file system: made,
 * mounted, files written, unmounted, and fsck.ext4 -fn finds it clean. Runs as root
 * (losetup, mount); everything is undone in teardown.
 */
import test from 'ava';
import { spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { TRANSPORTS, listenArgs, serve, sleep } from './helpers/nbd';
import { must, run } from './helpers/run';
import { tempDir } from './helpers/temp';

for (const transport of TRANSPORTS) {
  test.serial(`ext4 through nbdfuse and a loop device (${transport})`, async (t) => {
    const server = await serve(t, [...listenArgs(t, transport), 'memory:64M']);
    const dir = tempDir(t, 'tapkit-fuse-');
    const fuseDir = path.join(dir, 'fuse');
    const mnt = path.join(dir, 'mnt');
    fs.mkdirSync(fuseDir);
    fs.mkdirSync(mnt);
    const image = path.join(fuseDir, 'nbd');

    const fuse = spawn('nbdfuse', [fuseDir, server.uri], { stdio: ['ignore', 'ignore', 'pipe'] });
    let fuseErr = '';
    fuse.stderr!.on('data', (d) => (fuseErr += d));
    const fuseExited = new Promise<void>((resolve) => fuse.once('exit', () => resolve()));
    let loop = '';
    let mounted = false;
    // Teardown runs in reverse order of registration: unmount, detach, then unmount FUSE.
    t.teardown(async () => {
      await run('fusermount3', ['-u', fuseDir], { timeoutMs: 20_000 });
      if (fuse.exitCode === null && fuse.signalCode === null) fuse.kill('SIGKILL');
      await Promise.race([fuseExited, sleep(5000)]);
    });
    t.teardown(async () => {
      if (loop) await run('losetup', ['-d', loop], { timeoutMs: 20_000 });
    });
    t.teardown(async () => {
      if (mounted) await run('umount', [mnt], { timeoutMs: 20_000 });
    });

    const deadline = Date.now() + 30_000;
    while (!(fs.existsSync(image) && fs.statSync(image).size === 64 * 1024 * 1024)) {
      if (Date.now() > deadline) t.fail(`nbdfuse did not show the export: ${fuseErr}`);
      if (fuse.exitCode !== null) t.fail(`nbdfuse exited: ${fuseErr}`);
      await sleep(100);
    }
    loop = (await must('losetup', ['-f', '--show', image])).trim();
    t.regex(loop, /^\/dev\/loop\d+$/);
    await must('mkfs.ext4', ['-q', '-F', loop], { timeoutMs: 120_000 });
    await must('mount', [loop, mnt]);
    mounted = true;
    const files: Record<string, Buffer> = {};
    for (let i = 0; i < 8; i++) {
      const data = crypto.randomBytes(1024 * 1024 + i * 4099);
      files[`file${i}`] = data;
      fs.writeFileSync(path.join(mnt, `file${i}`), data);
    }
    fs.mkdirSync(path.join(mnt, 'sub'));
    fs.writeFileSync(path.join(mnt, 'sub', 'small'), 'tapkit over nbd\n');
    await must('sync', []);
    await must('umount', [mnt]);
    mounted = false;

    // Detach everything, so nothing can come from a kernel cache: what follows reads
    // only what reached the server.
    await must('losetup', ['-d', loop]);
    loop = '';
    await must('fusermount3', ['-u', fuseDir]);
    await Promise.race([fuseExited, sleep(10_000)]);
    const copy = path.join(dir, 'copy.img');
    await must('nbdcopy', [server.uri, copy], { timeoutMs: 120_000 });

    const fsck = await run('fsck.ext4', ['-fn', copy], { timeoutMs: 120_000 });
    t.is(fsck.code, 0, fsck.stdout + fsck.stderr);

    await must('mount', ['-o', 'ro,loop', copy, mnt]);
    mounted = true;
    for (const [name, data] of Object.entries(files)) t.true(fs.readFileSync(path.join(mnt, name)).equals(data), name);
    t.is(fs.readFileSync(path.join(mnt, 'sub', 'small'), 'utf8'), 'tapkit over nbd\n');
    await must('umount', [mnt]);
    mounted = false;
    t.is(await server.stop(), 0);
  });
}
