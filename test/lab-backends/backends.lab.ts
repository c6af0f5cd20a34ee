/**
 * The backend types and grant copy on a real Xen (docs/xen-lab.md), in the same lab as
 * xenlab.lab.ts (Xen 4.17, Linux PV dom0 and domU under qemu-system-x86_64 TCG), with
 * test/xenlab/scenario-backends.sh as dom0's scenario and tapkit moving request data by
 * grant copy (--grant-access copy: Linux gntdev's IOCTL_GNTDEV_GRANT_COPY):
 *  - vbd: `xl create` with a backendtype=phy disk, `tapkit xen serve` on backend/vbd;
 *  - qdisk: `xl create` with a backendtype=qdisk disk and device_model_override pointing
 *    at examples/xen/tapkit-qemu-dm: libxl starts `tapkit xen qemu-stub` as the guest's
 *    device model (QMP, device-model state) and it serves the VHD;
 *  - vbd3: a disk-less guest, then `tapkit xen attach --backend-type vbd3` while it runs
 *    (libxenstore, libxl's permissions): the guest's blkfront hot-plugs the disk.
 * Each guest checks its disk as in xenlab.lab.ts (size, checksum, marker, ext4 + fsck);
 * the host then checks the images handed back (qemu-img convert, e2fsck, tapkit vhd check).
 *
 * A second Xen boot (about 2.5 min on a quiet machine, 25–40 under heavy load): run by
 * `npm run test:xenlab` and test/run.sh after xenlab.lab.ts, or alone with
 * `bash test/xenlab/run-backends.sh`.
 */
import test from 'ava';
import { bootLab, buildLab, checkGuestRuns, Checks, makeImages, MiB, readIfPresent, runDirectory } from '../lab/harness';
import * as crypto from 'node:crypto';
import * as path from 'node:path';

test('Linux PV guests read and write through tapkit on backend/vbd, backend/qdisk (tapkit as the device model) and backend/vbd3 (hot-plugged), data by grant copy', async (t) => {
  t.timeout(50 * 60_000);
  if (!(await buildLab(t))) return;
  const labRun = runDirectory(t, 'xenlab-backends');
  const { dir } = labRun;
  const content = Buffer.concat([crypto.randomBytes(8 * MiB), Buffer.alloc(8 * MiB), crypto.randomBytes(8 * MiB)]);
  const expected = makeImages(t, dir, content);

  const boot = await bootLab(dir, 'scenario-backends.sh', { XENLAB_GRANTS: 'copy', XENLAB_VBD: 'disk.raw', XENLAB_QDISK: 'disk.vhd', XENLAB_VBD3: 'disk.raw' }, 45);
  const checks = new Checks();
  checks.ok(t.is(boot.code, 0, `lab run failed (${boot.code}):\n${boot.output}\n--- serial log tail ---\n${boot.serialTail}`));

  // How tapkit served each: connected, data by grant copy.
  const logs: Record<string, string> = {
    vbd: readIfPresent(path.join(dir, 'tapkit-vbd.log')),
    qdisk: readIfPresent(path.join(dir, 'tapkit-qdisk-disk.vhd.log')),
    vbd3: readIfPresent(path.join(dir, 'tapkit-vbd3.log')),
  };
  checks.subject = 'tapkit logs';
  for (const [way, log] of Object.entries(logs)) {
    checks.ok(t.regex(log, new RegExp(`\\b${way} \\d+/\\d+: connected: x86_64-abi, .*data by grant copy`), `${way}: tapkit's log:\n${log}`), `${way} connected, data by grant copy`);
  }
  checks.ok(t.regex(logs.qdisk, /qemu-stub for domain \d+ .*-xen-domid/, 'libxl started the stub with its QEMU arguments'), 'qdisk stub started with QEMU arguments');
  checks.ok(t.regex(logs.qdisk, /qemu-stub for domain \d+: stopped/, 'the stub stopped with the domain'), 'qdisk stub stopped');

  await checkGuestRuns(t, checks, labRun, [
    ['vbd', 'disk.raw', 'raw'],
    ['qdisk', 'disk.vhd', 'vpc'],
    ['vbd3', 'disk.raw', 'raw'],
  ] as const, content, expected);
});
