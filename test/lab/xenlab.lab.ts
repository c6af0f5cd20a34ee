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
import { bootLab, buildLab, checkGuestRuns, Checks, makeImages, MiB, runDirectory } from './harness';
import * as crypto from 'node:crypto';

/** 16 MiB (small: every byte crosses an emulated ring): random, zeros (holes in the VHD), random. */
function makeContent(): Buffer {
  return Buffer.concat([crypto.randomBytes(6 * MiB), Buffer.alloc(4 * MiB), crypto.randomBytes(6 * MiB)]);
}

test('a Linux PV guest reads and writes a raw image and a VHD through tapkit on Xen (direct ring, and blkback over the FUSE export)', async (t) => {
  t.timeout(45 * 60_000);
  if (!(await buildLab(t))) return;
  const labRun = runDirectory(t, 'xenlab');
  const { dir } = labRun;
  const content = makeContent();
  const expected = makeImages(t, dir, content);

  const boot = await bootLab(dir, 'scenario.sh', { XENLAB_DIRECT: 'disk.raw disk.vhd', XENLAB_KERNEL: 'disk.vhd', XENLAB_MKFS: '1', XENLAB_GUEST_TIMEOUT: '400' }, 40);
  const checks = new Checks();
  checks.ok(t.is(boot.code, 0, `lab run failed (${boot.code}):\n${boot.output}\n--- serial log tail ---\n${boot.serialTail}`));
  await checkGuestRuns(t, checks, labRun, [
    ['direct', 'disk.raw', 'raw'],
    ['direct', 'disk.vhd', 'vpc'],
    ['kernel', 'disk.vhd', 'vpc'],
  ] as const, content, expected);
});
