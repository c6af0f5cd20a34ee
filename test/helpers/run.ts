/**
 * The one way the tests run an external program (qemu-img, nbdinfo, fio, the tapkit CLI...).
 *
 * Always asynchronous: a synchronous run blocks the test process's event loop, and with it
 * the timers of every other test in the same file (a slow qemu-img once tripped other
 * tests' hang timers). Always bounded: past its timeout the program is killed with SIGKILL.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as path from 'node:path';

/** The built CLI (`dist/core/cli/main.js`; this file is compiled to dist/test/helpers/). */
export const CLI = path.join(__dirname, '..', '..', 'core', 'cli', 'main.js');

export const DEFAULT_TIMEOUT_MS = 60_000;

export interface RunOptions {
  /** Killed with SIGKILL when it runs longer (default 60 s). */
  timeoutMs?: number;
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Written to the program's stdin (stdin is /dev/null otherwise). */
  input?: string | Buffer;
}

export interface RunResult {
  /** The exit code; null when a signal ended the program (the timeout's SIGKILL included). */
  code: number | null;
  signal: NodeJS.Signals | null;
  /** True when the timeout killed it. */
  timedOut: boolean;
  stdout: string;
  stderr: string;
}

/**
 * Runs a program to completion. Never rejects: a program that cannot be started at all
 * (not installed, not executable) gives code 127, as a shell would, with the reason in stderr.
 */
export function run(command: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = spawn(command, args, {
      cwd: options.cwd,
      env: options.env ?? process.env,
      stdio: [options.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    let settled = false;
    const finish = (code: number | null, signal: NodeJS.Signals | null) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve({ code, signal, timedOut, stdout, stderr });
    };
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, options.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.once('error', (e) => {
      stderr += e.message;
      finish(127, null);
    });
    child.once('close', (code, signal) => finish(code, signal));
    if (options.input !== undefined) {
      child.stdin!.on('error', () => {}); // a program that exits without reading its input is not our failure
      child.stdin!.end(options.input);
    }
  });
}

/** The last `lines` lines of a program's output, for an error message. */
export function tail(text: string, lines = 20): string {
  const all = text.trimEnd().split('\n');
  return (all.length > lines ? ['...', ...all.slice(-lines)] : all).join('\n');
}

/** One line naming the command and how it ended, then the tail of its stderr (of its stdout when stderr is empty: tsc reports there). */
export function describeRun(command: string, args: readonly string[], r: RunResult, timeoutMs = DEFAULT_TIMEOUT_MS): string {
  const how = r.timedOut ? `was killed after its ${timeoutMs} ms timeout` : r.code === null ? `was killed by ${r.signal}` : `exited with code ${r.code}`;
  const err = tail(r.stderr);
  const out = err ? '' : tail(r.stdout);
  const said = err ? `; stderr:\n${err}` : out ? `; no stderr, stdout:\n${out}` : ' (no output)';
  return `${[command, ...args].join(' ')} ${how}${said}`;
}

/** A program that did not exit 0; the message says which, how it ended and what it said. */
export class RunError extends Error {
  constructor(
    readonly command: string,
    readonly args: readonly string[],
    readonly result: RunResult,
    timeoutMs?: number,
  ) {
    super(describeRun(command, args, result, timeoutMs));
    this.name = 'RunError';
  }

  get stdout(): string {
    return this.result.stdout;
  }

  get stderr(): string {
    return this.result.stderr;
  }
}

/** Runs a program; rejects with a RunError unless it exits 0. */
export async function mustRun(command: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  const r = await run(command, args, options);
  if (r.code !== 0) throw new RunError(command, args, r, options.timeoutMs);
  return r;
}

/** Runs a program and returns its stdout; rejects with a RunError unless it exits 0. */
export async function must(command: string, args: readonly string[], options: RunOptions = {}): Promise<string> {
  return (await mustRun(command, args, options)).stdout;
}

/** Runs the built tapkit CLI with this Node (never rejects; see run). */
export function tapkit(args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  return run(process.execPath, [CLI, ...args], options);
}

/** Stops a server the test started: SIGTERM, then SIGKILL after `graceMs`; resolves once it has exited. */
export async function stopChild(child: ChildProcess, graceMs = 5000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited;
  clearTimeout(timer);
}
