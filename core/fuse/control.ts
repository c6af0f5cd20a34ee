/**
 * How `tapkit unmount` finds and talks to the process serving a mount.
 *
 * Each serving process keeps two files in a runtime directory (`$TAPKIT_RUNTIME_DIR/fuse`,
 * default `/run/tapkit/fuse`), named by a hash of the mount point:
 *  - `<key>.json`: pid, mount point, file, spec, loop device, fusectl connection;
 *  - `<key>.sock`: a Unix socket taking one-line commands: `flush` (flush the VBD) and
 *    `status` (the JSON above), answered `ok [payload]` or `error <message>`.
 * A missing or refusing socket means the server is gone (or was killed): the mount is
 * stale, and `tapkit unmount` aborts its connection and cleans up without it.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { BlockError } from '../errors';

export interface MountState {
  pid: number;
  mountpoint: string;
  file: string;
  spec: string;
  loop?: string;
  connection: number;
}

export function runtimeDir(): string {
  return path.join(process.env.TAPKIT_RUNTIME_DIR ?? '/run/tapkit', 'fuse');
}

export function statePaths(mountpoint: string): { json: string; socket: string } {
  const key = createHash('sha256').update(mountpoint).digest('hex').slice(0, 16);
  const dir = runtimeDir();
  return { json: path.join(dir, `${key}.json`), socket: path.join(dir, `${key}.sock`) };
}

export function writeState(state: MountState): void {
  const { json } = statePaths(state.mountpoint);
  fs.mkdirSync(path.dirname(json), { recursive: true, mode: 0o700 });
  fs.writeFileSync(`${json}.tmp`, JSON.stringify(state, null, 2));
  fs.renameSync(`${json}.tmp`, json);
}

export function readState(mountpoint: string): MountState | undefined {
  try {
    return JSON.parse(fs.readFileSync(statePaths(mountpoint).json, 'utf8')) as MountState;
  } catch {
    return undefined;
  }
}

export function removeState(mountpoint: string): void {
  const { json, socket } = statePaths(mountpoint);
  for (const f of [json, socket]) fs.rmSync(f, { force: true });
}

export interface ControlHandlers {
  flush(): Promise<void>;
  status(): unknown;
}

/** Listens on the mount's control socket. */
export async function listenControl(mountpoint: string, handlers: ControlHandlers): Promise<net.Server> {
  const { socket } = statePaths(mountpoint);
  fs.mkdirSync(path.dirname(socket), { recursive: true, mode: 0o700 });
  fs.rmSync(socket, { force: true });
  const server = net.createServer((conn) => {
    let input = '';
    conn.setEncoding('utf8');
    conn.on('error', () => {});
    conn.on('data', (chunk: string) => {
      input += chunk;
      let nl: number;
      while ((nl = input.indexOf('\n')) >= 0) {
        const command = input.slice(0, nl).trim();
        input = input.slice(nl + 1);
        void answer(command).then((line) => conn.write(`${line}\n`));
      }
      if (input.length > 4096) conn.destroy();
    });
  });
  const answer = async (command: string): Promise<string> => {
    try {
      if (command === 'flush') {
        await handlers.flush();
        return 'ok';
      }
      if (command === 'status') return `ok ${JSON.stringify(handlers.status())}`;
      return `error unknown command '${command.slice(0, 40)}'`;
    } catch (e) {
      return `error ${(e as Error).message.replace(/\n/g, ' ')}`;
    }
  };
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(socket, () => {
      server.off('error', reject);
      resolve();
    });
  });
  fs.chmodSync(socket, 0o600);
  return server;
}

/**
 * Sends one command to a mount's server. Rejects with ESHUTDOWN when nothing listens
 * (the server is gone), ETIMEDOUT when it does not answer in time.
 */
export function sendControl(mountpoint: string, command: string, timeoutMs: number): Promise<string> {
  const { socket } = statePaths(mountpoint);
  return new Promise((resolve, reject) => {
    const conn = net.createConnection(socket);
    let input = '';
    const timer = setTimeout(() => {
      conn.destroy();
      reject(new BlockError('ETIMEDOUT', `the server of ${mountpoint} did not answer '${command}' within ${timeoutMs / 1000} s`));
    }, timeoutMs);
    conn.setEncoding('utf8');
    conn.on('connect', () => conn.write(`${command}\n`));
    conn.on('data', (chunk: string) => {
      input += chunk;
      const nl = input.indexOf('\n');
      if (nl < 0) return;
      clearTimeout(timer);
      conn.end();
      const line = input.slice(0, nl);
      if (line === 'ok' || line.startsWith('ok ')) resolve(line.slice(3));
      else reject(new BlockError('EIO', `the server of ${mountpoint}: ${line.replace(/^error /, '')}`));
    });
    conn.on('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      if (e.code === 'ENOENT' || e.code === 'ECONNREFUSED') reject(new BlockError('ESHUTDOWN', `no server is serving ${mountpoint}`));
      else reject(new BlockError('EIO', `control socket of ${mountpoint}: ${e.message}`));
    });
  });
}
