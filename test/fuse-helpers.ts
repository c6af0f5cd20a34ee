/**
 * Helpers for the FUSE export tests: run `tapkit mount` as a child process (the server
 * must not share the test's event loop: the test's own reads of the file would wait on
 * it), and clean up mounts and loop devices whatever happened.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';
import { loopsBackedBy } from '../core/fuse/loop';
import { abortConnection, connectionOf, findMount } from '../core/fuse/mounts';
import { CLI, must, run, tapkit } from './helpers/run';
import { tempDir } from './helpers/temp';

export interface Served {
  proc: ChildProcess;
  mountpoint: string;
  file: string;
  device?: string;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr(): string;
}

/**
 * Starts `tapkit mount SPEC MOUNTPOINT ...args` and waits for it to print the file (and
 * the loop device with --loop). Registers a teardown that unmounts and detaches
 * everything, even when the test failed or killed the server.
 */
export async function serve(t: ExecutionContext, spec: string, args: string[] = [], dir = tempDir(t, 'tapkit-fuse-'), env: Record<string, string> = {}): Promise<Served> {
  const mountpoint = path.join(dir, 'mnt');
  fs.mkdirSync(mountpoint, { recursive: true });
  const proc = spawn(process.execPath, [CLI, 'mount', spec, mountpoint, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  let stdout = '';
  let stderr = '';
  proc.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  t.teardown(() => cleanupMount(mountpoint, proc, exit));
  const lines = args.includes('--loop') ? 2 : 1;
  const deadline = Date.now() + 60_000;
  let exited = false;
  void exit.then(() => (exited = true));
  while (stdout.split('\n').filter(Boolean).length < lines) {
    if (exited) throw new Error(`tapkit mount exited early: ${stderr.trim()}`);
    if (Date.now() > deadline) throw new Error(`tapkit mount did not get ready in time: ${stderr.trim()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  const [file, device] = stdout.split('\n').filter(Boolean);
  return { proc, mountpoint, file, device, exit, stderr: () => stderr };
}

/** Last-resort cleanup: a polite `tapkit unmount`, then force whatever is left. */
export async function cleanupMount(mountpoint: string, proc: ChildProcess, exit: Promise<unknown>): Promise<void> {
  if (findMount(mountpoint)?.fstype === 'fuse.tapkit') await tapkit(['unmount', mountpoint], { timeoutMs: 60_000 });
  const entry = findMount(mountpoint);
  if (entry?.fstype === 'fuse.tapkit') {
    try {
      abortConnection(connectionOf(entry));
    } catch {}
    for (const { device } of loopsBackedBy({ under: mountpoint })) await run('losetup', ['-d', device], { timeoutMs: 30_000 });
    await run('umount', ['-l', mountpoint], { timeoutMs: 30_000 });
  }
  if (proc.exitCode === null && proc.signalCode === null) {
    proc.kill('SIGKILL');
    await Promise.race([exit, new Promise((r) => setTimeout(r, 10_000))]);
  }
}

/** Mounts `device` (ext4) on a fresh directory and unmounts it in teardown. */
export async function mountExt4(t: ExecutionContext, device: string, dir: string): Promise<{ path: string; unmount(): Promise<void> }> {
  const target = fs.mkdtempSync(path.join(dir, 'ext4-'));
  await must('mount', ['-t', 'ext4', device, target], { timeoutMs: 60_000 });
  let mounted = true;
  const unmount = async () => {
    if (!mounted) return;
    await must('umount', [target], { timeoutMs: 60_000 });
    mounted = false;
  };
  t.teardown(async () => {
    if (mounted) await run('umount', ['-l', target], { timeoutMs: 30_000 });
  });
  return { path: target, unmount };
}

/** sha256 of a whole file or device; `direct` reads with O_DIRECT (past any page cache). */
export async function sha256Of(file: string, direct = false): Promise<string> {
  const out = await must('bash', ['-c', `set -o pipefail; dd if="$1" bs=1M status=none ${direct ? 'iflag=direct' : ''} | sha256sum`, 'hash', file], { timeoutMs: 300_000 });
  return out.split(' ')[0];
}

export function sha256(buf: Uint8Array): string {
  return createHash('sha256').update(buf).digest('hex');
}

export function isMounted(mountpoint: string): boolean {
  return findMount(mountpoint)?.fstype === 'fuse.tapkit';
}

