/**
 * tapkit on a real Xen (docs/xen-lab.md): Xen 4.17 with a Linux PV dom0 and a PV domU,
 * booted in qemu-system-x86_64 (TCG). Two ways to give a guest its disk, each checked
 * by a real Linux blkfront:
 *  - direct ring: in dom0, `tapkit xen serve --platform xen` is the blkif backend on
 *    backend/vbd (libxenstore, /dev/xen/evtchn and /dev/xen/gntdev through ffi-napi);
 *    `xl create` gives the guest a raw image, then a dynamic VHD made by qemu-img;
 *  - kernel device: the hotplug script examples/xen/block-tapkit-mount runs
 *    `tapkit mount --loop` on the VHD and hands the loop device to the kernel's blkback.
 * The guest reads the whole disk (its checksum must be the image's), writes a marker,
 * makes an ext4 file system and fsck's it. Back on the host, the images are checked with
 * qemu-img, e2fsck and `tapkit vhd check`.
 *
 * Slow (minutes under TCG): test/run.sh runs it after the default suite, and `npm run
 * test:xenlab` alone. On failure
 * the run's directory (serial console, dom0 and tapkit logs, the guests' consoles) is kept
 * under .tmp/xenlab-failed-*.
 */
import test from 'ava';
import { consoleValue, lab, MARKER, md5, MiB, qemuRead, repo, run } from './harness';
import { execFileSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';


/** 16 MiB (small: every byte crosses an emulated ring): random, zeros (holes in the VHD), random. */
function makeContent(): Buffer {
  return Buffer.concat([crypto.randomBytes(6 * MiB), Buffer.alloc(4 * MiB), crypto.randomBytes(6 * MiB)]);
}

test('a Linux PV guest reads and writes a raw image and a VHD through tapkit on Xen (direct ring, and blkback over the FUSE export)', async (t) => {
  t.timeout(45 * 60_000);
  const build = await run('bash', ['test/xenlab/build.sh', lab], 900);
  t.is(build.code, 0, `lab build failed:\n${build.output}`);
  if (build.code !== 0) return;

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-xenlab-'));
  let keep = false;
  t.teardown(() => {
    if (keep) {
      const artifacts = path.join(repo, '.tmp', `xenlab-failed-${Date.now()}`);
      fs.mkdirSync(path.dirname(artifacts), { recursive: true });
      fs.cpSync(dir, artifacts, { recursive: true, filter: (p) => !/\/(node|tapkit\.tar|disk\.\w+)$/.test(p) });
      console.log(`xenlab: run kept in ${artifacts}`);
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const content = makeContent();
  fs.writeFileSync(path.join(dir, 'disk.raw'), content);
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=dynamic,force_size=on', path.join(dir, 'disk.raw'), path.join(dir, 'disk.vhd')], { timeout: 60_000 });
  const expected: Record<string, string> = { 'disk.raw': md5(content), 'disk.vhd': md5(qemuRead(path.join(dir, 'disk.vhd'), 'vpc', dir)) };
  t.is(expected['disk.vhd'], expected['disk.raw'], 'qemu-img made a VHD with the same contents');

  fs.copyFileSync(path.join(repo, 'test', 'xenlab', 'scenario.sh'), path.join(dir, 'scenario.sh'));
  fs.writeFileSync(path.join(dir, 'params'), 'XENLAB_DIRECT="disk.raw disk.vhd"\nXENLAB_KERNEL="disk.vhd"\nXENLAB_MKFS=1\nXENLAB_GUEST_TIMEOUT=400\n');

  // QEMU's own bound (boot.sh) comes first; this one only backs it up.
  const boot = await run('bash', ['test/xenlab/boot.sh', dir, lab], 42 * 60, { XENLAB_TIMEOUT: process.env.XENLAB_TIMEOUT ?? String(40 * 60) });
  const serial = fs.existsSync(path.join(dir, 'serial.log')) ? fs.readFileSync(path.join(dir, 'serial.log'), 'utf8') : '';
  const tail = serial.split('\n').slice(-80).join('\n');
  keep = true; // until every check below has run and passed
  // Every check is tallied by name (ava reports only the first failed assertion).
  const tally: string[] = [];
  let failures = 0;
  let current = 'boot';
  const ok = (passed: boolean, check = '') => {
    if (!passed) failures++;
    tally.push(`${passed ? 'ok  ' : 'FAIL'} ${current}${check ? `: ${check}` : ''}`);
  };
  ok(t.is(boot.code, 0, `lab run failed (${boot.code}):\n${boot.output}\n--- serial log tail ---\n${tail}`));

  for (const [way, image, format] of [
    ['direct', 'disk.raw', 'raw'],
    ['direct', 'disk.vhd', 'vpc'],
    ['kernel', 'disk.vhd', 'vpc'],
  ] as const) {
    current = `${way} ${image}`;
    const consolePath = path.join(dir, `console-${way}-${image}.log`);
    const guest = fs.existsSync(consolePath) ? fs.readFileSync(consolePath, 'utf8') : '';
    const what = `${way} ${image}: guest console:\n${guest}`;
    ok(t.is(consoleValue(guest, 'XENLAB-DOMU-SECTORS'), String(content.length / 512), `${what}\nsize seen by blkfront`), 'size seen by blkfront');
    ok(t.is(consoleValue(guest, 'XENLAB-DOMU-MD5'), expected[image], `${what}\nchecksum read by blkfront`), 'checksum read by blkfront');
    ok(t.regex(guest, /XENLAB-DOMU-MARKER-WRITTEN/, what), 'marker written');
    ok(t.regex(guest, /XENLAB-DOMU-MKFS-OK/, what), 'mkfs.ext4 in the guest');
    ok(t.regex(guest, /XENLAB-DOMU-FSCK-CLEAN/, what), 'e2fsck in the guest');
    ok(t.regex(guest, /XENLAB-DOMU-DONE/, what), 'guest done');

    // What the guest wrote is in the image, as qemu-img reads it.
    const out = path.join(dir, `out-${way}-${image}`);
    ok(t.true(fs.existsSync(out), `${image}: dom0 handed the image back`), 'image handed back');
    if (!fs.existsSync(out)) continue;
    if (format === 'vpc') {
      // qemu-img has no check for VHD (exit 63); it must at least open it at its size.
      const info = await run('qemu-img', ['info', '--output=json', '-f', 'vpc', out], 120);
      const virtualSize = info.code === 0 ? (JSON.parse(info.output) as { 'virtual-size': number })['virtual-size'] : -1;
      ok(t.is(virtualSize, content.length, `qemu-img info ${image}: ${info.output}`), 'qemu-img info: virtual size');
      const ours = await run(process.execPath, [path.join(repo, 'dist', 'core', 'cli', 'main.js'), 'vhd', 'check', out], 120);
      ok(t.is(ours.code, 0, `tapkit vhd check ${image}: ${ours.output}`), 'tapkit vhd check');
    }
    const after = qemuRead(out, format, dir);
    ok(t.is(after.length, content.length, `${image}: size after the run`), 'size after the run');
    ok(t.is(md5(after), consoleValue(guest, 'XENLAB-DOMU-MD5-AFTER') ?? 'absent', `${image}: the image holds what the guest last read`), 'image md5 = the guest\'s last md5');
    ok(t.is(after.subarray(after.length - 1024, after.length - 1024 + MARKER.length).toString(), MARKER, `${image}: the guest's marker`), 'marker in the image');
    const fsImage = path.join(dir, `${image}.fs`);
    fs.writeFileSync(fsImage, after.subarray(0, after.length - MiB));
    const fsck = await run('e2fsck', ['-f', '-n', fsImage], 120);
    ok(t.is(fsck.code, 0, `${image}: e2fsck on the host: ${fsck.output}`), 'host e2fsck');
    fs.rmSync(fsImage);
  }
  t.log(`checks:\n${tally.join('\n')}`);
  fs.writeFileSync(path.join(dir, 'checks.txt'), `${tally.join('\n')}\n`);
  keep = failures > 0;
  if (failures === 0) t.pass();
});
