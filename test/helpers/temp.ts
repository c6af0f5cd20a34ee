/**
 * The one way the tests make scratch directories: a fresh `mkdtemp` under the system temp
 * dir (unique, so tests running at once never share one), removed again when its owner ends.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';
import { readMounts } from '../../core/fuse/mounts';

/** Anything that can run a cleanup at its end (an ava test's `t`). */
export type Owner = Pick<ExecutionContext, 'teardown'>;

/**
 * A fresh directory, removed when the test ends (`t.teardown`). Teardowns run
 * last-registered first, so whatever a test mounts inside it later is gone by then; if a
 * mount is still there (its cleanup failed), the directory is left alone rather than walked into.
 */
export function tempDir(t: Owner, prefix = 'tapkit-'): string {
  const dir = makeDir(prefix);
  t.teardown(() => removeDir(dir));
  return dir;
}

const fileDirs = new Set<string>();

/**
 * A fresh directory for what a whole test file shares (made at load or in `test.before`,
 * where there is no test to own it), removed when the test process (one per test file) exits.
 */
export function fileTempDir(prefix = 'tapkit-'): string {
  const dir = makeDir(prefix);
  if (fileDirs.size === 0) process.once('exit', () => fileDirs.forEach(removeDir));
  fileDirs.add(dir);
  return dir;
}

function makeDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** Removes a scratch directory unless something is still mounted inside it. */
export function removeDir(dir: string): void {
  if (readMounts().some((m) => m.mountpoint === dir || m.mountpoint.startsWith(`${dir}/`))) return;
  fs.rmSync(dir, { recursive: true, force: true });
}
