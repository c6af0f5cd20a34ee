/**
 * Test helpers for the NBD export: run `tapkit serve` as a child process, wait until a
 * real client reaches it (`nbdinfo --size`), stop it by PID.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { ExecutionContext } from 'ava';
import { CLI, must, run } from './run';
import { tempDir } from './temp';

/** Debian's python3 (the one python3-libnbd installs into), whatever PATH says. */
export const PYTHON = '/usr/bin/python3';

export interface Served {
  process: ChildProcess;
  /** Every URI the server printed, in order (per listener, per export). */
  uris: string[];
  /** The first URI. */
  uri: string;
  stdout(): string;
  stderr(): string;
  /** Sends a signal and waits for the exit code (null when killed by a signal). */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
  exited: Promise<number | null>;
}

export interface ServeOptions {
  /** Extra arguments for the readiness probe (nbdinfo), e.g. TLS settings. */
  readyUri?: (uris: string[]) => string;
  /** Skip the nbdinfo probe (the caller checks readiness its own way). */
  noProbe?: boolean;
  env?: NodeJS.ProcessEnv;
}

/** Starts `tapkit serve ARGS`, waits for its URIs and for nbdinfo to reach it. */
export async function serve(t: ExecutionContext, args: string[], options: ServeOptions = {}): Promise<Served> {
  const child = spawn(process.execPath, [CLI, 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: options.env ?? process.env });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (err += d));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await exited;
    }
  });
  const served: Served = {
    process: child,
    uris: [],
    uri: '',
    stdout: () => out,
    stderr: () => err,
    exited,
    async stop(signal = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
  };
  const deadline = Date.now() + 30_000;
  let gone = false;
  void exited.then(() => (gone = true));
  while (!/^try: /m.test(out)) {
    if (gone) throw new Error(`tapkit serve exited early: ${err}`);
    if (Date.now() > deadline) throw new Error(`tapkit serve printed no URI within 30 s: ${out} ${err}`);
    await sleep(50);
  }
  served.uris = out.split('\n').filter((l) => /^nbds?(\+unix)?:\/\//.test(l));
  served.uri = served.uris[0];
  if (!options.noProbe) {
    const probe = options.readyUri ? options.readyUri(served.uris) : served.uri;
    for (;;) {
      const r = await run('nbdinfo', ['--size', probe], { timeoutMs: 10_000 });
      if (r.code === 0) break;
      if (gone) throw new Error(`tapkit serve exited: ${err}`);
      if (Date.now() > deadline) throw new Error(`nbdinfo never reached ${probe}: ${r.stderr}`);
      await sleep(100);
    }
  }
  return served;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Runs a python script that drives the export through libnbd (python3-libnbd). */
export async function nbdPython(t: ExecutionContext, uri: string, script: string): Promise<string> {
  const dir = tempDir(t, 'tapkit-nbdsh-');
  const file = path.join(dir, 'script.py');
  fs.writeFileSync(file, `import nbd, sys, errno\nuri = sys.argv[1]\n${script}\n`);
  return must(PYTHON, [file, uri], { timeoutMs: 120_000 });
}

/** The two transports every interop test runs over. */
export const TRANSPORTS = ['unix', 'tcp'] as const;
export type Transport = (typeof TRANSPORTS)[number];

export function listenArgs(t: ExecutionContext, transport: Transport): string[] {
  return transport === 'unix' ? ['--socket', path.join(tempDir(t, 'tapkit-nbd-'), 'nbd.sock')] : ['--listen', '127.0.0.1:0'];
}
