/**
 * The package's entry points as a provider author's project sees them: a project that
 * depends on tapkit through a `file:` link (npm makes that a symlink in node_modules, done
 * here by hand) resolves `tapkit`, `tapkit/conformance` and the older deep paths, in
 * CommonJS, in ESM and in TypeScript (node16 and node10 resolution).
 */
import test, { type ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { must } from './helpers/run';
import { tempDir } from './helpers/temp';

/** The repository root (this file is compiled to dist/test/). */
const ROOT = path.resolve(__dirname, '..', '..');
const TSC = path.join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc');

function consumer(t: ExecutionContext): string {
  const project = tempDir(t, 'tapkit-consumer-');
  fs.writeFileSync(path.join(project, 'package.json'), JSON.stringify({ name: 'tapkit-consumer', private: true, dependencies: { tapkit: `file:${ROOT}` } }));
  fs.mkdirSync(path.join(project, 'node_modules'));
  fs.symlinkSync(ROOT, path.join(project, 'node_modules', 'tapkit'));
  return project;
}

test('CommonJS: tapkit, tapkit/conformance and the old deep paths resolve, to the files they always named', async (t) => {
  const project = consumer(t);
  const script = `
const specifiers = ['tapkit', 'tapkit/conformance', 'tapkit/dist/test/conformance', 'tapkit/dist/test/conformance.js', 'tapkit/dist/core/errors', 'tapkit/package.json'];
const resolved = Object.fromEntries(specifiers.map((s) => [s, require.resolve(s)]));
const suite = require('tapkit/conformance');
process.stdout.write(JSON.stringify({
  resolved,
  runConformance: typeof suite.runConformance,
  sameModule: suite === require('tapkit/dist/test/conformance'),
  provider: typeof require('tapkit').provider,
}));`;
  const out = JSON.parse(await must(process.execPath, ['-e', script], { cwd: project, timeoutMs: 60_000 }));
  const dist = (file: string) => path.join(ROOT, 'dist', file);
  t.deepEqual(out.resolved, {
    tapkit: dist('core/index.js'),
    'tapkit/conformance': dist('test/conformance.js'),
    'tapkit/dist/test/conformance': dist('test/conformance.js'),
    'tapkit/dist/test/conformance.js': dist('test/conformance.js'),
    'tapkit/dist/core/errors': dist('core/errors.js'),
    'tapkit/package.json': path.join(ROOT, 'package.json'),
  });
  t.is(out.runConformance, 'function');
  t.true(out.sameModule, 'the new and the old path give one module');
  t.is(out.provider, 'function');
});

test('ESM: named imports from tapkit and tapkit/conformance', async (t) => {
  const project = consumer(t);
  const script = `import { runConformance } from 'tapkit/conformance'; import { provider } from 'tapkit'; process.stdout.write(typeof runConformance + ' ' + typeof provider);`;
  t.is(await must(process.execPath, ['--input-type=module', '-e', script], { cwd: project, timeoutMs: 60_000 }), 'function function');
});

test('the bin and main named in package.json exist', (t) => {
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { main: string; bin: Record<string, string> };
  t.true(fs.existsSync(path.join(ROOT, pkg.main)), pkg.main);
  const bin = path.join(ROOT, pkg.bin.tapkit);
  t.true(fs.readFileSync(bin, 'utf8').startsWith('#!/usr/bin/env node'), `${pkg.bin.tapkit} is a node script`);
});

for (const resolution of [{ module: 'node16', moduleResolution: 'node16' }, { module: 'commonjs', moduleResolution: 'node10' }]) {
  test(`TypeScript (${resolution.moduleResolution} resolution) finds the types of tapkit/conformance and the old path`, async (t) => {
    const project = consumer(t);
    fs.writeFileSync(
      path.join(project, 'suite.ts'),
      `import test from 'ava';
import { runConformance } from 'tapkit/conformance';
import { runConformance as older } from 'tapkit/dist/test/conformance';
import { parseSize } from 'tapkit';
const same: typeof runConformance = older;
const size: number = parseSize('1M', 'size', 'mine:1M');
same(test, { name: 'mine', open: () => \`mine:\${size}\` });
`,
    );
    // ava's types come from tapkit's own node_modules here (a real project has ava as a dev dependency).
    fs.symlinkSync(path.join(ROOT, 'node_modules', 'ava'), path.join(project, 'node_modules', 'ava'));
    await must(process.execPath, [TSC, '--noEmit', '--strict', '--skipLibCheck', '--types', 'node', '--typeRoots', path.join(ROOT, 'node_modules', '@types'), '--module', resolution.module, '--moduleResolution', resolution.moduleResolution, 'suite.ts'], {
      cwd: project,
      timeoutMs: 120_000,
    });
    t.pass('tsc type-checked the consumer');
  });
}
