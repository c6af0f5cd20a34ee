/**
 * What `npm pack` puts in the tarball is enough to run tapkit: the built CLI and library,
 * the conformance kit, the providers' pages and the Xen/daemon scripts in examples/ (which
 * users copy into /etc/xen/scripts). The tarball is unpacked next to the repository's
 * node_modules, as an install would place it.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { must, run } from './helpers/run';
import { tempDir } from './helpers/temp';

const ROOT = path.join(__dirname, '..', '..');

test('the npm tarball holds the built CLI, library, conformance kit, provider pages and scripts, and its CLI runs', async (t) => {
  const dir = tempDir(t, 'tapkit-pack-');
  // --ignore-scripts: `prepare` would rebuild dist/ under the other tests' feet.
  const packed = JSON.parse(await must('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', dir], { cwd: ROOT, timeoutMs: 120_000 }));
  const files = new Set<string>(packed[0].files.map((f: { path: string }) => f.path));
  for (const needed of [
    'dist/core/cli/main.js',
    'dist/core/index.js',
    'dist/core/index.d.ts',
    'dist/test/conformance.js',
    'dist/providers/vhd/index.js',
    'providers/vhd/README.md',
    'examples/xen/block-tapkit-mount',
    'README.md',
  ]) {
    t.true(files.has(needed), `${needed} is in the tarball`);
  }
  t.false([...files].some((f) => f.startsWith('dist/test/') && !f.startsWith('dist/test/conformance.')), 'no test files besides the conformance kit');
  t.false([...files].some((f) => f.startsWith('node_modules/') || f.startsWith('.tmp/')));

  await must('tar', ['-xzf', path.join(dir, packed[0].filename), '-C', dir]);
  const pkg = path.join(dir, 'package');
  fs.symlinkSync(path.join(ROOT, 'node_modules'), path.join(pkg, 'node_modules'));
  const info = await run(process.execPath, [path.join(pkg, 'dist/core/cli/main.js'), 'info', 'memory:1M'], { timeoutMs: 60_000 });
  t.is(info.code, 0, info.stderr);
  t.regex(info.stdout, /1048576|1\.0 MiB|1 MiB/);
  t.true((fs.statSync(path.join(pkg, 'examples/xen/block-tapkit-mount')).mode & 0o111) !== 0, 'the hotplug script stays executable');
});
