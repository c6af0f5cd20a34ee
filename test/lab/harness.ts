/**
 * What the Xen lab's test files share (test/lab/xenlab.lab.ts, test/lab-backends/backends.lab.ts):
 * where the repository and the lab's build are, a bounded runner for the lab's scripts, the
 * run's directory and images, the boot, and the checks of a guest's run.
 */
import type { ExecutionContext } from 'ava';
import { execFileSync, spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

export const repo = path.resolve(__dirname, '..', '..', '..');
export const lab = path.join(repo, '.tmp', 'xenlab');
export const MiB = 1024 * 1024;
export const MARKER = 'hello-from-domU-blkfront';

/** Runs under timeout(1) (SIGKILL 10 s after the bound); resolves with the code and stdout+stderr. */
export function run(command: string, args: string[], timeoutSeconds: number, env: Record<string, string> = {}): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve) => {
    const child = spawn('timeout', ['--kill-after=10', String(timeoutSeconds), command, ...args], { cwd: repo, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
    let output = '';
    child.stdout.on('data', (d) => (output += d));
    child.stderr.on('data', (d) => (output += d));
    child.on('close', (code) => resolve({ code, output }));
  });
}

export const md5 = (bytes: Buffer) => crypto.createHash('md5').update(bytes).digest('hex');

/** The disk as qemu-img reads it (raw bytes). */
export function qemuRead(file: string, format: string, dir: string): Buffer {
  const out = path.join(dir, `${path.basename(file)}.qemu-raw`);
  execFileSync('qemu-img', ['convert', '-f', format, '-O', 'raw', file, out], { timeout: 60_000 });
  const bytes = fs.readFileSync(out);
  fs.rmSync(out);
  return bytes;
}

/** The value a guest printed as `KEY value` on a line of its console. */
export function consoleValue(log: string, key: string): string | undefined {
  return new RegExp(`^${key} (\\S+)\\s*$`, 'm').exec(log)?.[1];
}

/** Builds the lab images (test/xenlab/build.sh; nothing to do when they are current). False (and a failed assertion) when it fails. */
export async function buildLab(t: ExecutionContext): Promise<boolean> {
  const build = await run('bash', ['test/xenlab/build.sh', lab], 900);
  return t.is(build.code, 0, `lab build failed:\n${build.output}`);
}

/**
 * A run's directory (shared into dom0 as /lab). Removed at teardown; kept under
 * .tmp/NAME-failed-* (without Node, tapkit's tarball and the input images) unless
 * `passed()` was called.
 */
export function runDirectory(t: ExecutionContext, name: string): { dir: string; passed(): void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `tapkit-${name}-`));
  let keep = true;
  t.teardown(() => {
    if (keep) {
      const artifacts = path.join(repo, '.tmp', `${name}-failed-${Date.now()}`);
      fs.mkdirSync(path.dirname(artifacts), { recursive: true });
      fs.cpSync(dir, artifacts, { recursive: true, filter: (p) => !/\/(node|tapkit\.tar|disk\.\w+)$/.test(p) });
      console.log(`xenlab: run kept in ${artifacts}`);
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return { dir, passed: () => (keep = false) };
}

/** RUN_DIR/disk.raw holding `content` and disk.vhd (dynamic) made from it by qemu-img; returns the content's md5. */
export function makeImages(t: ExecutionContext, dir: string, content: Buffer): string {
  fs.writeFileSync(path.join(dir, 'disk.raw'), content);
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=dynamic,force_size=on', path.join(dir, 'disk.raw'), path.join(dir, 'disk.vhd')], { timeout: 60_000 });
  const expected = md5(content);
  t.is(md5(qemuRead(path.join(dir, 'disk.vhd'), 'vpc', dir)), expected, 'qemu-img made a VHD with the same contents');
  return expected;
}

/**
 * Boots the lab with test/xenlab/SCENARIO as dom0's scenario and PARAMS as /lab/params;
 * bounded by QEMU's own timeout (boot.sh, `minutes`), backed up by ours.
 */
export async function bootLab(dir: string, scenario: string, params: Record<string, string>, minutes: number): Promise<{ code: number | null; output: string; serialTail: string }> {
  fs.copyFileSync(path.join(repo, 'test', 'xenlab', scenario), path.join(dir, 'scenario.sh'));
  fs.writeFileSync(path.join(dir, 'params'), Object.entries(params).map(([k, v]) => `${k}="${v}"\n`).join(''));
  const boot = await run('bash', ['test/xenlab/boot.sh', dir, lab], (minutes + 2) * 60, { XENLAB_TIMEOUT: process.env.XENLAB_TIMEOUT ?? String(minutes * 60) });
  const serial = readIfPresent(path.join(dir, 'serial.log'));
  return { ...boot, serialTail: serial.split('\n').slice(-80).join('\n') };
}

export const readIfPresent = (file: string) => (fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '');

/**
 * Checks tallied by name: ava reports only the first failed assertion of a test, the
 * tally (logged, and written to RUN_DIR/checks.txt) shows all of them.
 */
export class Checks {
  private readonly lines: string[] = [];
  failures = 0;
  /** What the next checks are about (a path and image). */
  subject = 'boot';

  ok(passed: boolean, check = ''): void {
    if (!passed) this.failures++;
    this.lines.push(`${passed ? 'ok  ' : 'FAIL'} ${this.subject}${check ? `: ${check}` : ''}`);
  }

  report(t: ExecutionContext, dir: string): void {
    t.log(`checks:\n${this.lines.join('\n')}`);
    fs.writeFileSync(path.join(dir, 'checks.txt'), `${this.lines.join('\n')}\n`);
  }
}

/**
 * One guest's run over one image (domu-init.sh with xenlab_mkfs=1): what its console says
 * (size, checksum, marker, ext4 + fsck, done), then the image dom0 handed back
 * (RUN_DIR/out-WAY-IMAGE): it opens (qemu-img info and `tapkit vhd check` for a VHD),
 * holds what the guest last read and its marker, and its file system is clean (host e2fsck).
 */
export async function checkGuestRun(t: ExecutionContext, checks: Checks, dir: string, way: string, image: string, format: 'raw' | 'vpc', content: Buffer, expected: string): Promise<void> {
  checks.subject = `${way} ${image}`;
  const ok = checks.ok.bind(checks);
  const guest = readIfPresent(path.join(dir, `console-${way}-${image}.log`));
  const what = `${way} ${image}: guest console:\n${guest}`;
  ok(t.is(consoleValue(guest, 'XENLAB-DOMU-SECTORS'), String(content.length / 512), `${what}\nsize seen by blkfront`), 'size seen by blkfront');
  ok(t.is(consoleValue(guest, 'XENLAB-DOMU-MD5'), expected, `${what}\nchecksum read by blkfront`), 'checksum read by blkfront');
  ok(t.regex(guest, /XENLAB-DOMU-MARKER-WRITTEN/, what), 'marker written');
  ok(t.regex(guest, /XENLAB-DOMU-MKFS-OK/, what), 'mkfs.ext4 in the guest');
  ok(t.regex(guest, /XENLAB-DOMU-FSCK-CLEAN/, what), 'e2fsck in the guest');
  ok(t.regex(guest, /XENLAB-DOMU-DONE/, what), 'guest done');

  const out = path.join(dir, `out-${way}-${image}`);
  ok(t.true(fs.existsSync(out), `${way} ${image}: dom0 handed the image back`), 'image handed back');
  if (!fs.existsSync(out)) return;
  if (format === 'vpc') {
    // qemu-img has no check for VHD (exit 63); it must at least open it at its size.
    const info = await run('qemu-img', ['info', '--output=json', '-f', 'vpc', out], 120);
    const virtualSize = info.code === 0 ? (JSON.parse(info.output) as { 'virtual-size': number })['virtual-size'] : -1;
    ok(t.is(virtualSize, content.length, `qemu-img info ${way} ${image}: ${info.output}`), 'qemu-img info: virtual size');
    const ours = await run(process.execPath, [path.join(repo, 'dist', 'core', 'cli', 'main.js'), 'vhd', 'check', out], 120);
    ok(t.is(ours.code, 0, `tapkit vhd check ${way} ${image}: ${ours.output}`), 'tapkit vhd check');
  }
  const after = qemuRead(out, format, dir);
  ok(t.is(after.length, content.length, `${way} ${image}: size after the run`), 'size after the run');
  ok(t.is(md5(after), consoleValue(guest, 'XENLAB-DOMU-MD5-AFTER') ?? 'absent', `${way} ${image}: the image holds what the guest last read`), "image md5 = the guest's last md5");
  ok(t.is(after.subarray(after.length - 1024, after.length - 1024 + MARKER.length).toString(), MARKER, `${way} ${image}: the guest's marker`), 'marker in the image');
  const fsImage = path.join(dir, `${way}-${image}.fs`);
  fs.writeFileSync(fsImage, after.subarray(0, after.length - MiB));
  const fsck = await run('e2fsck', ['-f', '-n', fsImage], 120);
  ok(t.is(fsck.code, 0, `${way} ${image}: e2fsck on the host: ${fsck.output}`), 'host e2fsck');
  fs.rmSync(fsImage);
}

/**
 * Every guest run's checks (checkGuestRun for each [way, image, format]), then the tally
 * logged and written; the run passes (its directory is not kept) only when no check failed.
 */
export async function checkGuestRuns(
  t: ExecutionContext,
  checks: Checks,
  run: { dir: string; passed(): void },
  ways: ReadonlyArray<readonly [string, string, 'raw' | 'vpc']>,
  content: Buffer,
  expected: string,
): Promise<void> {
  for (const [way, image, format] of ways) await checkGuestRun(t, checks, run.dir, way, image, format, content, expected);
  checks.report(t, run.dir);
  if (checks.failures === 0) {
    run.passed();
    t.pass();
  }
}
