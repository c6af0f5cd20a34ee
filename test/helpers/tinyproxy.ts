/**
 * A real http proxy for tests: tinyproxy on 127.0.0.1 at a free port, its config, pid
 * file and log in a private temp dir. Its log lines name every request it forwarded
 * (`Request (file descriptor N): GET http://… HTTP/1.1`, `CONNECT host:port HTTP/1.1`).
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { stopChild } from './run';
import { freePort } from './nginx';

export interface Tinyproxy {
  /** `http://127.0.0.1:PORT` */
  url: string;
  port: number;
  /** The requests forwarded so far, as tinyproxy logged them (`GET http://…`, `CONNECT h:p`). */
  requests(): string[];
  stop(): Promise<void>;
}

async function listening(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1', () => {
      socket.destroy();
      resolve(true);
    });
    socket.on('error', () => resolve(false));
  });
}

/** Starts tinyproxy; `basicAuth` ('user:password') makes it ask for credentials (407). */
export async function startTinyproxy(options: { basicAuth?: string } = {}): Promise<Tinyproxy> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-tinyproxy-'));
  const port = await freePort();
  const log = path.join(dir, 'tinyproxy.log');
  const auth = options.basicAuth ? `BasicAuth ${options.basicAuth.replace(':', ' ')}\n` : '';
  fs.writeFileSync(
    path.join(dir, 'tinyproxy.conf'),
    `Port ${port}\nListen 127.0.0.1\nTimeout 60\nLogFile "${log}"\nLogLevel Connect\nPidFile "${dir}/tinyproxy.pid"\nMaxClients 64\nAllow 127.0.0.1\n${auth}`,
  );
  const child = spawn('tinyproxy', ['-d', '-c', path.join(dir, 'tinyproxy.conf')], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  const until = Date.now() + 10_000;
  while (!(await listening(port))) {
    if (child.exitCode !== null || Date.now() > until) {
      child.kill('SIGKILL');
      throw new Error(`tinyproxy did not start on ${port}: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    requests: () => {
      const text = fs.existsSync(log) ? fs.readFileSync(log, 'utf8') : '';
      return [...text.matchAll(/Request \(file descriptor \d+\): (.*?) HTTP\/1\.[01]/g)].map((m) => m[1]);
    },
    stop: async () => {
      await stopChild(child);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
