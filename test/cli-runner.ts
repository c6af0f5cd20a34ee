/** Runs the built tapkit CLI (`node dist/core/cli/main.js`) as a child process, bounded in time. */
import { execFile } from 'node:child_process';
import * as path from 'node:path';

/** The repository root (this file is compiled to dist/test/). */
export const ROOT = path.resolve(__dirname, '..', '..');
export const CLI = path.join(ROOT, 'dist', 'core', 'cli', 'main.js');

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

export interface CliOptions {
  cwd?: string;
  /** A command the CLI runs under (e.g. `['setpriv', ...]` to drop privileges). */
  prefix?: string[];
  timeoutMs?: number;
}

export function runCli(args: string[], options: CliOptions = {}): Promise<CliResult> {
  const [command, ...rest] = [...(options.prefix ?? []), process.execPath, CLI, ...args];
  return new Promise((resolve) => {
    execFile(
      command,
      rest,
      { cwd: options.cwd ?? ROOT, timeout: options.timeoutMs ?? 120_000, maxBuffer: 16 << 20, encoding: 'utf8' },
      (error, stdout, stderr) => {
        const code = error ? (typeof error.code === 'number' ? error.code : null) : 0;
        resolve({ code, stdout, stderr });
      },
    );
  });
}
