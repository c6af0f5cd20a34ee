/**
 * What the Xen lab's test files share (test/lab/xenlab.lab.ts, test/lab-backends/backends.lab.ts):
 * where the repository and the lab's build are, a bounded runner for the lab's scripts, and
 * readers of the disk images and the guests' consoles.
 */
import { execFileSync, spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
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
