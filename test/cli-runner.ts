/** Runs the built tapkit CLI (`node dist/core/cli/main.js`) as a child process, bounded in time. */
import * as path from 'node:path';
import { run, type RunResult } from './helpers/run';

/** The repository root (this file is compiled to dist/test/). */
export const ROOT = path.resolve(__dirname, '..', '..');
export const CLI = path.join(ROOT, 'dist', 'core', 'cli', 'main.js');

export type CliResult = RunResult;

export interface CliOptions {
  cwd?: string;
  /** A command the CLI runs under (e.g. `['setpriv', ...]` to drop privileges). */
  prefix?: string[];
  timeoutMs?: number;
}

export function runCli(args: string[], options: CliOptions = {}): Promise<CliResult> {
  const [command, ...rest] = [...(options.prefix ?? []), process.execPath, CLI, ...args];
  return run(command, rest, { cwd: options.cwd ?? ROOT, timeoutMs: options.timeoutMs ?? 120_000 });
}
