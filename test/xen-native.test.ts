/**
 * The `xen` platform's bindings where there is no Xen: libxenstore (native/xenstore.ts)
 * against a real XenStore wire server (tapkit's sim xenstored, in a child process, reached
 * through XENSTORED_PATH exactly as Xen's own tools reach it), and the clear errors the
 * platform gives on a machine without /dev/xen. The platform on a real hypervisor is
 * tested by the lab (xenlab.test.ts).
 */
import test from 'ava';
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BlockError } from '../core/errors';
import { XenPlatform } from '../core/ring/xen/platform';
import { XsHandle } from '../native/xenstore';

const repo = path.resolve(__dirname, '..', '..');
const cli = path.join(repo, 'dist', 'core', 'cli', 'main.js');

/** `tapkit xen serve --platform sim:DIR` in a child process: its xenstored socket is ours to use. */
async function simXenstored(t: any): Promise<string> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-xs-'));
  const child: ChildProcess = spawn(process.execPath, [cli, 'xen', 'serve', '--platform', `sim:${dir}`, '--quiet'], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => {
    child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  });
  await new Promise<void>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`sim xenstored did not start: ${out}`)), 60_000);
    child.stdout!.on('data', (d) => {
      out += d;
      if (out.includes('serving')) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.stderr!.on('data', (d) => (out += d));
    child.on('exit', (code) => reject(new Error(`sim xenstored exited (${code}): ${out}`)));
  });
  return path.join(dir, 'xenstored.sock');
}

function withXenstoredPath<T>(socket: string | undefined, fn: () => T): T {
  const before = process.env.XENSTORED_PATH;
  if (socket === undefined) delete process.env.XENSTORED_PATH;
  else process.env.XENSTORED_PATH = socket;
  try {
    return fn();
  } finally {
    if (before === undefined) delete process.env.XENSTORED_PATH;
    else process.env.XENSTORED_PATH = before;
  }
}

test.serial('libxenstore: read, write, directory, rm, transactions and watches against a XenStore wire server', async (t) => {
  const socket = await simXenstored(t);
  const xs = withXenstoredPath(socket, () => new XsHandle());
  t.teardown(() => xs.close());

  xs.write('/local/domain/7/data/a', 'one');
  xs.write('/local/domain/7/data/b', '');
  t.is(xs.read('/local/domain/7/data/a'), 'one');
  t.is(xs.read('/local/domain/7/data/b'), '');
  t.is(xs.read('/local/domain/7/data/missing'), undefined);
  t.deepEqual(xs.directory('/local/domain/7/data').sort(), ['a', 'b']);
  t.deepEqual(xs.directory('/local/domain/7/nothing'), []);

  // A watch fires once when set, then on every change at or below its path.
  const seen: string[] = [];
  let wake: () => void = () => {};
  const w = xs.watch('/local/domain/7/data', (p) => {
    seen.push(p);
    wake();
  });
  const waitFor = (pred: () => boolean) =>
    new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`watch events so far: ${seen.join(' ')}`)), 20_000);
      wake = () => {
        if (pred()) {
          clearTimeout(timer);
          resolve();
        }
      };
      wake();
    });
  await waitFor(() => seen.includes('/local/domain/7/data'));
  xs.write('/local/domain/7/data/c', 'three');
  await waitFor(() => seen.includes('/local/domain/7/data/c'));

  // A committed transaction lands; one that lost a race reports false and changes nothing.
  const tx = xs.transactionStart();
  xs.write('/local/domain/7/data/a', 'two', tx);
  t.is(xs.read('/local/domain/7/data/a'), 'one', 'not visible outside the transaction yet');
  t.true(xs.transactionEnd(tx, true));
  t.is(xs.read('/local/domain/7/data/a'), 'two');
  const loser = xs.transactionStart();
  t.is(xs.read('/local/domain/7/data/a', loser), 'two');
  xs.write('/local/domain/7/data/a', 'lost', loser);
  xs.write('/local/domain/7/data/a', 'winner');
  t.false(xs.transactionEnd(loser, true));
  t.is(xs.read('/local/domain/7/data/a'), 'winner');

  xs.rm('/local/domain/7/data/b');
  xs.rm('/local/domain/7/data/b'); // already gone: not an error
  t.is(xs.read('/local/domain/7/data/b'), undefined);
  w.cancel();
  // close() wakes the watch thread and returns (the test would hang otherwise).
  await xs.close();
});

test.serial('the xen platform fails clearly where there is no XenStore', (t) => {
  withXenstoredPath(path.join(os.tmpdir(), 'tapkit-no-such-xenstored.sock'), () => {
    if (fs.existsSync('/run/xenstored/socket') || fs.existsSync('/dev/xen/xenbus')) return t.pass('this machine is a Xen dom0');
    const e = t.throws(() => new XenPlatform(), { instanceOf: BlockError });
    t.is(e?.code, 'ENODEV');
    t.regex(e?.message ?? '', /no XenStore here.*not a Xen dom0/);
  });
});

test.serial('the xen platform fails clearly where there is a XenStore but no /dev/xen/gntdev', async (t) => {
  if (fs.existsSync('/dev/xen/gntdev')) return t.pass('this machine is a Xen dom0');
  const socket = await simXenstored(t);
  const e = withXenstoredPath(socket, () => t.throws(() => new XenPlatform(), { instanceOf: BlockError }));
  t.is(e?.code, 'ENODEV');
  t.regex(e?.message ?? '', /\/dev\/xen\/gntdev is absent/);
});

test.serial('tapkit xen serve --platform xen: one clear line and exit status 1 without Xen', async (t) => {
  if (fs.existsSync('/dev/xen/gntdev')) return t.pass('this machine is a Xen dom0');
  const child = spawn(process.execPath, [cli, 'xen', 'serve', '--platform', 'xen'], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, XENSTORED_PATH: '/nonexistent/xenstored.sock' } });
  let err = '';
  child.stderr.on('data', (d) => (err += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  clearTimeout(timer);
  t.is(code, 1);
  t.regex(err, /not a Xen dom0/);
  t.is(err.trim().split('\n').length, 1, err);
});
