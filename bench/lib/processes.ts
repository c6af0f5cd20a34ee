/**
 * Child processes of a bench: run a tool with a hard timeout, start a server pinned to a
 * CPU and wait until it answers, and stop every server we started — on the normal path,
 * on exit and on SIGINT/SIGTERM — so that no server outlives the bench.
 */
import { spawn, spawnSync, type ChildProcess, type SpawnOptions } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const live = new Set<ChildProcess>();
const exitHooks: Array<() => void> = [];
let hooked = false;

/** Runs `fn` (synchronously) when the bench exits, however it exits. Later hooks run first. */
export function onExit(fn: () => void): void {
  installHooks();
  exitHooks.unshift(fn);
}

function installHooks(): void {
  if (hooked) return;
  hooked = true;
  process.on('exit', () => {
    for (const child of [...live]) stopProcess(child);
    for (const hook of exitHooks.splice(0)) {
      try {
        hook();
      } catch (e) {
        process.stderr.write(`cleanup: ${e instanceof Error ? e.message : String(e)}\n`);
      }
    }
  });
  for (const signal of ['SIGINT', 'SIGTERM'] as const) process.on(signal, () => process.exit(130));
}

export function sleepSync(seconds: number): void {
  spawnSync('sleep', [String(seconds)]);
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Runs a command to completion and returns its stdout; throws with its stderr when it fails or times out. */
export function run(cmd: string[], timeoutSeconds = 900): string {
  const r = spawnSync(cmd[0], cmd.slice(1), { encoding: 'utf8', timeout: timeoutSeconds * 1000, maxBuffer: 64 << 20, killSignal: 'SIGKILL' });
  if (r.status !== 0) throw new Error(`${cmd.join(' ')} failed (${r.status ?? r.signal ?? r.error?.message}): ${r.stderr ?? ''}`);
  return r.stdout;
}

/** stdout of a command that may fail (versions, probes); '' when it does. */
export function output(cmd: string[], timeoutSeconds = 60): string {
  return spawnSync(cmd[0], cmd.slice(1), { encoding: 'utf8', timeout: timeoutSeconds * 1000 }).stdout ?? '';
}

/** Throws when one of the tools is not on PATH. */
export function requireTools(...tools: string[]): void {
  for (const tool of tools) if (spawnSync('which', [tool]).status !== 0) throw new Error(`${tool} is missing`);
}

/** Starts a long-running child that stopAll/exit will stop. `prefix` is usually a taskset pin. */
export function startProcess(cmd: string[], options: SpawnOptions = { stdio: ['ignore', 'ignore', 'inherit'] }): ChildProcess {
  installHooks();
  const child = spawn(cmd[0], cmd.slice(1), options);
  live.add(child);
  child.once('exit', () => live.delete(child));
  return child;
}

/** TERM, up to 5 s, then KILL; synchronous, so it also works from an exit handler. */
export function stopProcess(child: ChildProcess): void {
  live.delete(child);
  const pid = child.pid;
  if (!pid || child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  const deadline = Date.now() + 5000;
  while (Date.now() < deadline && isAlive(pid)) sleepSync(0.1);
  if (isAlive(pid)) child.kill('SIGKILL');
}

export function stopAll(): void {
  for (const child of [...live]) stopProcess(child);
}

/** Polls `ready` every 100 ms until it holds; throws after `timeoutSeconds` or when `child` dies first. */
export function waitUntil(what: string, ready: () => boolean, timeoutSeconds = 30, child?: ChildProcess): void {
  const deadline = Date.now() + timeoutSeconds * 1000;
  while (!ready()) {
    if (child && child.pid && !isAlive(child.pid)) throw new Error(`${what}: the process exited before it was ready`);
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    sleepSync(0.1);
  }
}

export function nbdUri(socket: string): string {
  return `nbd+unix:///?socket=${socket}`;
}

/** True when an NBD server answers on the socket (nbdinfo --size, 5 s bound). */
export function nbdAnswers(socket: string): boolean {
  return spawnSync('nbdinfo', ['--size', nbdUri(socket)], { timeout: 5000 }).status === 0;
}

/**
 * Starts an NBD server on a private Unix socket (removing a stale socket file first) and
 * waits until nbdinfo gets an answer from it. Its stderr goes to ours.
 */
export function startNbdServer(id: string, cmd: string[], socket: string, timeoutSeconds = 30): ChildProcess {
  fs.rmSync(socket, { force: true });
  const child = startProcess(cmd);
  try {
    waitUntil(`${id} on ${socket}`, () => nbdAnswers(socket), timeoutSeconds, child);
  } catch (e) {
    stopProcess(child);
    throw e;
  }
  return child;
}

/** A bench's scratch directory (tmpfs when there is one; WORKDIR to choose), removed at exit unless KEEP is set. */
export function benchWorkdir(name: string): string {
  const dir = process.env.WORKDIR ?? fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), `tapkit-bench-${name}-`));
  onExit(() => {
    if (!process.env.KEEP) fs.rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}
