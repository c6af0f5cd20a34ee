/**
 * A real nginx for tests: serves one directory on 127.0.0.1 at a free port, with a
 * config, pid file and logs in a private temp dir. `stop()` kills it and waits.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { stopChild } from './run';

export interface Nginx {
  /** `http://127.0.0.1:PORT` */
  base: string;
  port: number;
  root: string;
  stop(): Promise<void>;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const port = (server.address() as net.AddressInfo).port;
      server.close(() => resolve(port));
    });
  });
}

async function waitForPort(port: number, child: ChildProcess, log: string, deadlineMs: number): Promise<void> {
  const until = Date.now() + deadlineMs;
  while (Date.now() < until) {
    if (child.exitCode !== null) throw new Error(`nginx exited with ${child.exitCode}: ${fs.existsSync(log) ? fs.readFileSync(log, 'utf8') : ''}`);
    const ok = await new Promise<boolean>((resolve) => {
      const socket = net.connect(port, '127.0.0.1', () => {
        socket.destroy();
        resolve(true);
      });
      socket.on('error', () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`nginx did not listen on ${port} within ${deadlineMs} ms`);
}

/**
 * The one nginx configuration of the project (tests and bench/http): `root` on
 * 127.0.0.1:`port`, static files with sendfile and long keep-alive, pid, logs and temp
 * directories under `dir`.
 */
export function nginxConfig(dir: string, port: number, root: string): string {
  const temps = ['client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'].map((name) => `  ${name}_temp_path ${dir}/${name.replace('client_', '')};`).join('\n');
  return `${process.getuid?.() === 0 ? 'user root;\n' : ''}worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
${temps}
  default_type application/octet-stream;
  sendfile on;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:${port}; root ${root}; }
}
`;
}

/** Starts nginx serving `root` (retries on a port race). */
export async function startNginx(root: string): Promise<Nginx> {
  const prefix = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-nginx-'));
  for (let attempt = 0; ; attempt++) {
    const port = await freePort();
    const log = path.join(prefix, 'error.log');
    const conf = path.join(prefix, 'nginx.conf');
    fs.writeFileSync(conf, nginxConfig(prefix, port, root));
    const child = spawn('nginx', ['-c', conf, '-p', prefix, '-g', 'daemon off;'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (d) => (stderr += d));
    try {
      await waitForPort(port, child, log, 10_000);
    } catch (e) {
      child.kill('SIGKILL');
      if (attempt < 3 && /Address already in use/.test(stderr + String(e))) continue;
      throw new Error(`${(e as Error).message} ${stderr}`);
    }
    const stop = async () => {
      await stopChild(child);
      fs.rmSync(prefix, { recursive: true, force: true });
    };
    return { base: `http://127.0.0.1:${port}`, port, root, stop };
  }
}
