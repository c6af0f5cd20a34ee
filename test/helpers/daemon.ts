/** Starts a `tapkit daemon` child for a test and talks to it over its control socket. */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { controlRequest, type ControlRequest, type ControlResponse } from '../../core/daemon/protocol';
import { CLI } from './run';

export { CLI };

export interface RunningDaemon {
  dir: string;
  control: string;
  child: ChildProcess;
  log: () => string;
  call(request: ControlRequest): Promise<ControlResponse>;
  /** Calls and returns the result, failing on an error answer. */
  ok<T = unknown>(request: ControlRequest): Promise<T>;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

export async function startDaemon(args: string[] = [], dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-daemon-'))): Promise<RunningDaemon> {
  const control = path.join(dir, 'control.sock');
  const child = spawn(process.execPath, [CLI, 'daemon', '--control', control, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  child.stderr!.on('data', (chunk) => (log += chunk));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const deadline = Date.now() + 20_000;
  for (;;) {
    try {
      const r = await controlRequest(control, { op: 'ping' }, 2000);
      if (r.ok) break;
    } catch {
      /* not up yet */
    }
    if (child.exitCode !== null || Date.now() > deadline) throw new Error(`daemon did not start: ${log}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  const running: RunningDaemon = {
    dir,
    control,
    child,
    log: () => log,
    call: (request) => controlRequest(control, request),
    async ok<T>(request: ControlRequest): Promise<T> {
      const r = await controlRequest(control, request);
      if (!r.ok) throw new Error(`${request.op} failed: ${r.error.code} ${r.error.message}`);
      return r.result as T;
    },
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      if (child.exitCode === null) child.kill(signal);
      const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
      const code = await exited;
      clearTimeout(timer);
      fs.rmSync(dir, { recursive: true, force: true });
      return code;
    },
  };
  return running;
}
