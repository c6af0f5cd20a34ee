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
import { consoleValue, lab, MARKER, md5, MiB, qemuRead, repo, run } from '../lab/harness';
import { execFileSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';


const readIf = (file: string) => (fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '');

test('Linux PV guests read and write through tapkit on backend/vbd, backend/qdisk (tapkit as the device model) and backend/vbd3 (hot-plugged), data by grant copy', async (t) => {
  t.timeout(50 * 60_000);
  const build = await run('bash', ['test/xenlab/build.sh', lab], 900);
  t.is(build.code, 0, `lab build failed:\n${build.output}`);
  if (build.code !== 0) return;

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-xenlab-backends-'));
  let keep = false;
  t.teardown(() => {
    if (keep) {
      const artifacts = path.join(repo, '.tmp', `xenlab-backends-failed-${Date.now()}`);
      fs.mkdirSync(path.dirname(artifacts), { recursive: true });
      // The images handed back are kept (3 × 24 MiB) so the host-side checks can be redone.
      fs.cpSync(dir, artifacts, { recursive: true, filter: (p) => !/\/(node|tapkit\.tar|disk\.\w+)$/.test(p) });
      console.log(`xenlab: run kept in ${artifacts}`);
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const content = Buffer.concat([crypto.randomBytes(8 * MiB), Buffer.alloc(8 * MiB), crypto.randomBytes(8 * MiB)]);
  fs.writeFileSync(path.join(dir, 'disk.raw'), content);
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=dynamic,force_size=on', path.join(dir, 'disk.raw'), path.join(dir, 'disk.vhd')], { timeout: 60_000 });
  const expected = md5(content);
  t.is(md5(qemuRead(path.join(dir, 'disk.vhd'), 'vpc', dir)), expected, 'qemu-img made a VHD with the same contents');

  fs.copyFileSync(path.join(repo, 'test', 'xenlab', 'scenario-backends.sh'), path.join(dir, 'scenario.sh'));
  fs.writeFileSync(path.join(dir, 'params'), 'XENLAB_GRANTS=copy\nXENLAB_VBD="disk.raw"\nXENLAB_QDISK="disk.vhd"\nXENLAB_VBD3="disk.raw"\n');

  const boot = await run('bash', ['test/xenlab/boot.sh', dir, lab], 47 * 60, { XENLAB_TIMEOUT: process.env.XENLAB_TIMEOUT ?? String(45 * 60) });
  const serial = readIf(path.join(dir, 'serial.log'));
  const tail = serial.split('\n').slice(-80).join('\n');
  keep = true;
  let failures = 0;
  const ok = (passed: boolean) => {
    if (!passed) failures++;
  };
  ok(t.is(boot.code, 0, `lab run failed (${boot.code}):\n${boot.output}\n--- serial log tail ---\n${tail}`));

  // How tapkit served each: connected, data by grant copy.
  const logs: Record<string, string> = {
    vbd: readIf(path.join(dir, 'tapkit-vbd.log')),
    qdisk: readIf(path.join(dir, 'tapkit-qdisk-disk.vhd.log')),
    vbd3: readIf(path.join(dir, 'tapkit-vbd3.log')),
  };
  for (const [way, log] of Object.entries(logs)) ok(t.regex(log, new RegExp(`\\b${way} \\d+/\\d+: connected: x86_64-abi, .*data by grant copy`), `${way}: tapkit's log:\n${log}`));
  ok(t.regex(logs.qdisk, /qemu-stub for domain \d+ .*-xen-domid/, 'libxl started the stub with its QEMU arguments'));
  ok(t.regex(logs.qdisk, /qemu-stub for domain \d+: stopped/, 'the stub stopped with the domain'));

  for (const [way, image, format] of [
    ['vbd', 'disk.raw', 'raw'],
    ['qdisk', 'disk.vhd', 'vpc'],
    ['vbd3', 'disk.raw', 'raw'],
  ] as const) {
    const guest = readIf(path.join(dir, `console-${way}-${image}.log`));
    const what = `${way} ${image}: guest console:\n${guest}`;
    ok(t.is(consoleValue(guest, 'XENLAB-DOMU-SECTORS'), String(content.length / 512), `${what}\nsize seen by blkfront`));
    ok(t.is(consoleValue(guest, 'XENLAB-DOMU-MD5'), expected, `${what}\nchecksum read by blkfront`));
    ok(t.regex(guest, /XENLAB-DOMU-MARKER-WRITTEN/, what));
    ok(t.regex(guest, /XENLAB-DOMU-MKFS-OK/, what));
    ok(t.regex(guest, /XENLAB-DOMU-FSCK-CLEAN/, what));
    ok(t.regex(guest, /XENLAB-DOMU-DONE/, what));

    const out = path.join(dir, `out-${way}-${image}`);
    ok(t.true(fs.existsSync(out), `${way} ${image}: dom0 handed the image back`));
    if (!fs.existsSync(out)) continue;
    if (format === 'vpc') {
      // qemu-img has no check for vpc (exit 63); qemu-img convert below reads it whole.
      const ours = await run(process.execPath, [path.join(repo, 'dist', 'core', 'cli', 'main.js'), 'vhd', 'check', out], 120);
      ok(t.is(ours.code, 0, `tapkit vhd check ${way} ${image}: ${ours.output}`));
    }
    const after = qemuRead(out, format, dir);
    ok(t.is(after.length, content.length, `${way} ${image}: size after the run`));
    ok(t.is(md5(after), consoleValue(guest, 'XENLAB-DOMU-MD5-AFTER') ?? 'absent', `${way} ${image}: the image holds what the guest last read`));
    ok(t.is(after.subarray(after.length - 1024, after.length - 1024 + MARKER.length).toString(), MARKER, `${way} ${image}: the guest's marker`));
    const fsImage = path.join(dir, `${way}-${image}.fs`);
    fs.writeFileSync(fsImage, after.subarray(0, after.length - MiB));
    const fsck = await run('e2fsck', ['-f', '-n', fsImage], 120);
    ok(t.is(fsck.code, 0, `${way} ${image}: e2fsck on the host: ${fsck.output}`));
    fs.rmSync(fsImage);
  }
  keep = failures > 0;
  if (failures === 0) t.pass();
});
