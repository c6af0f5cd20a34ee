/**
 * Every provider kind over every export kind of the daemon: a device per provider (memory,
 * raw, VHD and qcow2 made by qemu-img, an http object on nginx, a cache filter), created
 * with `nbd:`, `fuse:` and `xen:` exports. Over NBD and FUSE each is written through its
 * export where it is writable and read back whole by a real client (qemu-img/qemu-io, the
 * kernel's FUSE file), compared with what the image holds; over Xen (the sim platform) the
 * C frontend built on Xen's headers writes and reads back through the ring (or checks a
 * read-only vbd refuses writes), and the image holds its pattern afterwards.
 */
import test, { type ExecutionContext } from 'ava';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { DeviceSummary } from '../core/daemon/devices';
import { startDaemon, type RunningDaemon } from './helpers/daemon';
import { startNginx } from './helpers/nginx';
import { cleanupMount } from './fuse-helpers';
import { firstMismatch, runFrontend } from './xen/harness';
import { must } from './helpers/run';
import { tempDir } from './helpers/temp';

const MiB = 1 << 20;
const SIZE = 4 * MiB;
const PATCH_AT = MiB;
const PATCH = 64 * 1024;

interface Case {
  name: string;
  spec: string;
  writable: boolean;
  /** What the disk holds before the test writes. */
  content: Buffer;
  /** The image file, read by qemu-img once the device is gone (where writes must have landed). */
  image?: { file: string; format: string };
}

/** Makes one image of each kind in `dir`, all holding the same random bytes. */
async function cases(t: ExecutionContext, dir: string): Promise<Case[]> {
  const content = randomBytes(SIZE);
  const raw = path.join(dir, 'disk.raw');
  fs.writeFileSync(raw, content);
  const served = path.join(dir, 'served');
  fs.mkdirSync(served);
  fs.copyFileSync(raw, path.join(served, 'disk.raw'));
  const nginx = await startNginx(served);
  t.teardown(() => nginx.stop());
  const vhd = path.join(dir, 'disk.vhd');
  await must('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=dynamic,force_size=on', raw, vhd]);
  const qcow2 = path.join(dir, 'disk.qcow2');
  await must('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-c', raw, qcow2]);
  const cached = path.join(dir, 'cached.raw');
  fs.copyFileSync(raw, cached);
  return [
    { name: 'memory', spec: `memory:${SIZE}`, writable: true, content: Buffer.alloc(SIZE) },
    { name: 'raw', spec: `raw:${raw}`, writable: true, content, image: { file: raw, format: 'raw' } },
    { name: 'vhd', spec: `vhd:${vhd}`, writable: true, content, image: { file: vhd, format: 'vpc' } },
    { name: 'qcow2', spec: `qcow2:${qcow2}`, writable: false, content },
    { name: 'http', spec: `${nginx.base}/disk.raw`, writable: false, content },
    { name: 'cache', spec: `cache,size=1M:raw:${cached}`, writable: true, content, image: { file: cached, format: 'raw' } },
  ];
}

interface ExportDriver {
  /** The export argument for a device, and how a client reaches it. */
  exportFor(daemon: RunningDaemon, name: string): { text: string; target: string };
  write(target: string, offset: number, data: Buffer, dir: string): Promise<void>;
  readAll(target: string, dir: string): Promise<Buffer>;
  cleanup?(target: string, daemon: RunningDaemon): Promise<void>;
}

const EXPORTS: Record<string, ExportDriver> = {
  nbd: {
    exportFor: (daemon, name) => {
      const socket = path.join(daemon.dir, `${name}.sock`);
      return { text: `nbd:${socket}`, target: `nbd+unix:///?socket=${socket}` };
    },
    async write(uri, offset, data, dir) {
      const file = path.join(dir, 'patch.bin');
      fs.writeFileSync(file, data);
      // qemu-io writes a file's bytes with its `write -s` (source file) command.
      await must('qemu-io', ['-f', 'raw', '-c', `write -s ${file} ${offset} ${data.length}`, uri]);
    },
    async readAll(uri, dir) {
      const out = path.join(dir, `read-${Math.random().toString(36).slice(2)}.raw`);
      await must('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out]);
      const data = fs.readFileSync(out);
      fs.rmSync(out);
      return data;
    },
  },
  fuse: {
    exportFor: (daemon, name) => {
      const mountpoint = path.join(daemon.dir, `mnt-${name}`);
      fs.mkdirSync(mountpoint);
      return { text: `fuse:${mountpoint}`, target: mountpoint };
    },
    async write(mountpoint, offset, data) {
      const fd = fs.openSync(path.join(mountpoint, 'disk'), 'r+');
      try {
        fs.writeSync(fd, data, 0, data.length, offset);
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
    },
    async readAll(mountpoint) {
      return fs.readFileSync(path.join(mountpoint, 'disk'));
    },
    async cleanup(mountpoint, daemon) {
      await cleanupMount(mountpoint, daemon.child, Promise.resolve());
    },
  },
};

for (const [kind, driver] of Object.entries(EXPORTS)) {
  test(`every provider kind over the daemon's ${kind} export`, async (t) => {
    const daemon = await startDaemon();
    const targets: string[] = [];
    t.teardown(async () => {
      await daemon.stop();
      for (const target of targets) await driver.cleanup?.(target, daemon);
    });
    const scratch = fs.mkdtempSync(path.join(daemon.dir, 'scratch-'));
    for (const c of await cases(t, daemon.dir)) {
      const { text, target } = driver.exportFor(daemon, c.name);
      targets.push(target);
      const device = await daemon.ok<DeviceSummary>({ op: 'create', spec: c.spec, name: c.name, exports: [text] });
      t.is(device.size, SIZE, `${c.name}: size`);
      t.is(device.readOnly, !c.writable, `${c.name}: read-only`);
      const expected = Buffer.from(c.content);
      if (c.writable) {
        const patch = randomBytes(PATCH);
        await driver.write(target, PATCH_AT, patch, scratch);
        patch.copy(expected, PATCH_AT);
      }
      t.true((await driver.readAll(target, scratch)).equals(expected), `${c.name} over ${kind}: the disk read back`);
      await daemon.ok({ op: 'destroy', device: device.id });
      if (c.image) {
        const out = path.join(scratch, `${c.name}.qemu.raw`);
        await must('qemu-img', ['convert', '-f', c.image.format, '-O', 'raw', c.image.file, out]);
        t.true(fs.readFileSync(out).equals(expected), `${c.name} over ${kind}: the image qemu-img reads after destroy`);
        fs.rmSync(out);
      }
    }
    t.deepEqual(await daemon.ok({ op: 'list' }), []);
  });
}

test('every provider kind over the daemon\'s xen export (sim platform, C frontend)', async (t) => {
  const daemon = await startDaemon();
  t.teardown(() => daemon.stop());
  const sim = tempDir(t, 'tapkit-matrix-xen-');
  const devid = 51712;
  const seed = 7;
  let domid = 5;
  for (const c of await cases(t, daemon.dir)) {
    const device = await daemon.ok<DeviceSummary>({ op: 'create', spec: c.spec, name: c.name, exports: [`xen:${domid}/${devid},platform=sim:${sim},attach`] });
    t.is(device.readOnly, !c.writable, `${c.name}: read-only`);
    const scenario = c.writable ? ['rw', '--seed', String(seed)] : ['readonly'];
    const frontend = await runFrontend(sim, domid, devid, scenario);
    t.is(frontend.code, 0, `${c.name} over xen: ${frontend.stdout}${frontend.stderr}`);
    t.regex(frontend.stdout, c.writable ? /^ok rw/m : /^ok readonly/m);
    await daemon.ok({ op: 'destroy', device: device.id });
    if (c.image) {
      // The rw scenario wrote its pattern over the first 256 KiB: it must be in the image now.
      const out = path.join(daemon.dir, `${c.name}.xen.raw`);
      await must('qemu-img', ['convert', '-f', c.image.format, '-O', 'raw', c.image.file, out]);
      t.is(firstMismatch(fs.readFileSync(out).subarray(0, 256 * 1024), 0, seed), -1, `${c.name} over xen: the image holds what the guest wrote`);
      fs.rmSync(out);
    }
    domid++;
  }
  t.deepEqual(await daemon.ok({ op: 'list' }), []);
});
