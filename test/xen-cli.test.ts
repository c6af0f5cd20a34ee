/**
 * `tapkit xen serve|attach|detach` as a user runs them: a serving process on a sim
 * directory, the toolstack verbs from other processes, the C frontend in between, a
 * clean exit on SIGTERM; usage errors are one line with exit code 2.
 */
import test from 'ava';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { CLI, runCli } from './cli-runner';
import { runFrontend } from './xen/harness';
import { tempDir } from './helpers/temp';

test('serve, attach, a frontend, detach, SIGTERM: the vbd is served from its params and everything is cleaned up', async (t) => {
  const dir = tempDir(t, 'tapkit-xen-cli-');
  const image = path.join(dir, 'disk.raw');
  fs.writeFileSync(image, Buffer.alloc(64 << 20));
  const serve = spawn(process.execPath, [CLI, 'xen', 'serve', '--platform', `sim:${dir}`], { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  serve.stdout.on('data', (d) => (log += d));
  serve.stderr.on('data', (d) => (log += d));
  const exited = new Promise<number | null>((resolve) => serve.on('exit', (code) => resolve(code)));
  const killer = setTimeout(() => serve.kill('SIGKILL'), 120_000);
  t.teardown(() => {
    clearTimeout(killer);
    serve.kill('SIGKILL');
  });
  for (let i = 0; i < 1200 && !log.includes('serving'); i++) await new Promise((r) => setTimeout(r, 50));
  t.regex(log, /tapkit xen: serving sim:/);

  const attach = await runCli(['xen', 'attach', '--platform', `sim:${dir}`, '--domid', '3', '--devid', '51728', `raw:${image}`]);
  t.is(attach.code, 0, attach.stderr);
  const again = await runCli(['xen', 'attach', '--platform', `sim:${dir}`, '--domid', '3', '--devid', '51728', `raw:${image}`]);
  t.is(again.code, 1);
  t.regex(again.stderr, /already exists/);

  const fe = await runFrontend(dir, 3, 51728, ['rw', '--seed', '21']);
  t.is(fe.code, 0, fe.stdout + fe.stderr + log);
  // The data reached the raw file the vbd's params named.
  const disk = fs.readFileSync(image);
  t.is(disk[0], 21);
  t.is(disk[513], (31 + 1 + 21) & 0xff);

  const detach = await runCli(['xen', 'detach', '--platform', `sim:${dir}`, '--domid', '3', '--devid', '51728', '--timeout', '20']);
  t.is(detach.code, 0, detach.stderr);
  t.is(detach.stderr, '', 'the backend reached Closed in time');
  for (let i = 0; i < 600 && !/vbd 3\/51728: ended/.test(log); i++) await new Promise((r) => setTimeout(r, 50));
  t.regex(log, /vbd 3\/51728: ended/);

  serve.kill('SIGTERM');
  t.is(await exited, 0, log);
  t.false(fs.existsSync(path.join(dir, 'xenstored.sock')));
  t.false(fs.existsSync(path.join(dir, 'evtchn.sock')));
});

test('usage errors are one line with exit code 2; a toolstack verb without a running platform exits 1', async (t) => {
  const dir = tempDir(t, 'tapkit-xen-cli-');
  for (const args of [
    ['xen', 'serve', '--platform', 'teleport:x'],
    ['xen', 'serve', '--platform', 'sim:'],
    ['xen', 'serve', '--platform', `sim:${dir}`, '--max-ring-page-order', '9'],
    ['xen', 'attach', '--platform', `sim:${dir}`, '--domid', '0', '--devid', '1', 'memory:1M'],
    ['xen', 'detach', '--platform', `sim:${dir}`, '--domid', '3', '--devid', 'x'],
  ]) {
    const r = await runCli(args, { timeoutMs: 30_000 });
    t.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    t.is(r.stderr.trim().split('\n').length, 1, r.stderr);
  }
  const r = await runCli(['xen', 'attach', '--platform', `sim:${dir}`, '--domid', '3', '--devid', '1', 'memory:1M'], { timeoutMs: 30_000 });
  t.is(r.code, 1);
  t.regex(r.stderr, /cannot reach the sim XenStore/);
});
