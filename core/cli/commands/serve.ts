/**
 * `tapkit serve [EXPORT...]`: serves disks over NBD until SIGINT or SIGTERM.
 *
 * EXPORT is `NAME=SPEC` or a bare SPEC (the default export, name ""). With no export at
 * all it serves a sparse `memory:1G` disk, so `tapkit serve` alone gives something to try
 * `qemu-img info` on. Without --socket or --listen it listens on a Unix socket in the
 * user's runtime directory.
 *
 * Shutdown: the first signal stops accepting clients, lets running requests finish, then
 * flushes and closes every VBD and exits 0; a second SIGINT exits at once.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { Command } from 'commander';
import { NbdServer, type NbdExport } from '../../nbd';
import { formatSize, parseSize } from '../../size';
import { Vbd } from '../../vbd';
import { addOpenOptions, openerFor, UsageError, type OpenCliOptions } from '../context';

interface ServeOptions extends OpenCliOptions {
  socket?: string;
  listen?: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  maxRequest: string;
  connections: string;
  quiet?: boolean;
}

/** What `tapkit serve` serves when given no export. */
export const DEFAULT_EXPORT_SPEC = 'memory:1G';

export function register(program: Command): void {
  addOpenOptions(
    program
      .command('serve')
      .argument('[exports...]', 'NAME=SPEC or SPEC (the default export ""); none: a sparse memory:1G disk')
      .description('serve disks over NBD (fixed newstyle, structured replies, block status, TLS)'),
  )
    .option('--socket <path>', 'listen on a Unix socket (default when --listen is not given)')
    .option('--listen <host:port>', 'listen on TCP (port 0 picks a free one)')
    .option('--read-only', 'refuse writes on every export')
    .option('--tls-cert <file>', 'PEM certificate: TLS becomes required (with --tls-key)')
    .option('--tls-key <file>', 'PEM private key for --tls-cert')
    .option('--tls-ca <file>', 'PEM CA: clients must present a certificate it signed')
    .option('--max-request <bytes>', 'largest read or write accepted', '32M')
    .option('--connections <n>', 'clients served at once', '64')
    .option('--quiet', 'do not log client problems on stderr')
    .action(async (specs: string[], options: ServeOptions) => {
      const settings = parseServeOptions(options);
      const exportArgs = specs.length > 0 ? specs.map(parseExportArg) : [{ name: '', spec: DEFAULT_EXPORT_SPEC }];
      const seen = new Set<string>();
      for (const { name } of exportArgs) {
        if (seen.has(name)) throw new UsageError(`export name '${name}' is given twice`);
        seen.add(name);
      }

      const served: NbdExport[] = [];
      const closeAll = async () => {
        for (const exp of served.splice(0)) await exp.vbd.close();
      };
      try {
        const opener = openerFor(options);
        for (const { name, spec } of exportArgs) {
          const vbd = new Vbd(await opener.open(spec), { name: name || spec, readOnly: !!options.readOnly });
          served.push({ name, vbd, description: spec });
        }
      } catch (e) {
        await closeAll().catch(() => {});
        throw e;
      }

      const log = options.quiet ? () => {} : (m: string) => process.stderr.write(`tapkit serve: ${m}\n`);
      const server = new NbdServer({
        exports: served,
        tls: settings.tls,
        maxRequest: settings.maxRequest,
        maxConnections: settings.connections,
        log,
      });

      const socketPath = options.socket ?? (options.listen ? undefined : defaultSocketPath());
      const uris: string[] = [];
      try {
        if (socketPath) {
          fs.mkdirSync(path.dirname(socketPath), { recursive: true, mode: 0o700 });
          await server.listen({ path: socketPath });
          for (const exp of served) uris.push(unixUri(exp.name, socketPath, server.tls));
        }
        if (settings.listen) {
          const address = await server.listen(settings.listen);
          const port = typeof address === 'string' ? settings.listen.port : address.port;
          for (const exp of served) uris.push(tcpUri(exp.name, settings.listen.host, port, server.tls));
        }
      } catch (e) {
        await server.close();
        await closeAll();
        throw new UsageError(`cannot listen: ${(e as Error).message}`);
      }

      const lines: string[] = [];
      for (const exp of served) {
        const info = exp.vbd.info();
        lines.push(`tapkit: serving '${exp.name}' = ${exp.description} (${formatSize(info.size)}, ${info.readOnly || !exp.vbd.capabilities().write ? 'read-only' : 'read-write'})`);
      }
      lines.push(...uris);
      lines.push(`try: qemu-img info '${uris[0]}'`);
      process.stdout.write(`${lines.join('\n')}\n`);

      await waitForSignal(log);
      await server.close();
      if (socketPath) fs.rmSync(socketPath, { force: true });
      await closeAll();
      log('stopped');
    });
}

interface ServeSettings {
  listen?: { host: string; port: number };
  tls?: { cert: Buffer; key: Buffer; ca?: Buffer };
  maxRequest: number;
  connections: number;
}

function parseServeOptions(options: ServeOptions): ServeSettings {
  const maxRequest = parseSize(options.maxRequest, '--max-request');
  if (maxRequest < 4096 || maxRequest > 0xffffffff) throw new UsageError(`--max-request must be between 4K and 4G-1 (got ${options.maxRequest})`);
  const connections = Number(options.connections);
  if (!Number.isInteger(connections) || connections < 1) throw new UsageError(`--connections must be a whole number of at least 1 (got '${options.connections}')`);
  if (!!options.tlsCert !== !!options.tlsKey) throw new UsageError('--tls-cert and --tls-key go together');
  if (options.tlsCa && !options.tlsCert) throw new UsageError('--tls-ca needs --tls-cert and --tls-key');
  const readPem = (file: string, what: string) => {
    try {
      return fs.readFileSync(file);
    } catch (e) {
      throw new UsageError(`cannot read ${what} ${file}: ${(e as Error).message}`);
    }
  };
  const tls = options.tlsCert
    ? {
        cert: readPem(options.tlsCert, '--tls-cert'),
        key: readPem(options.tlsKey!, '--tls-key'),
        ca: options.tlsCa ? readPem(options.tlsCa, '--tls-ca') : undefined,
      }
    : undefined;
  return { listen: options.listen ? parseHostPort(options.listen) : undefined, tls, maxRequest, connections };
}

/** `NAME=SPEC` when what precedes the first '=' looks like a name (no ':', ',' or '/'), else a bare SPEC. */
export function parseExportArg(arg: string): { name: string; spec: string } {
  const eq = arg.indexOf('=');
  if (eq >= 0 && !/[:,/]/.test(arg.slice(0, eq))) {
    const spec = arg.slice(eq + 1);
    if (spec === '') throw new UsageError(`export '${arg}' has no spec after '='`);
    return { name: arg.slice(0, eq), spec };
  }
  return { name: '', spec: arg };
}

/** `HOST:PORT`, `[v6]:PORT`, or `:PORT` (all addresses). */
export function parseHostPort(text: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(text);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new UsageError(`--listen expects HOST:PORT (got '${text}')`);
  return { host: m[1] ?? (m[2] || '0.0.0.0'), port };
}

export function defaultSocketPath(): string {
  const runtime = process.env.XDG_RUNTIME_DIR;
  if (runtime) return path.join(runtime, 'tapkit', 'nbd.sock');
  return path.join(os.tmpdir(), `tapkit-${process.getuid?.() ?? 'user'}`, 'nbd.sock');
}

function unixUri(name: string, socket: string, tls: boolean): string {
  return `nbd${tls ? 's' : ''}+unix:///${encodeURIComponent(name)}?socket=${socket}`;
}

function tcpUri(name: string, host: string, port: number, tls: boolean): string {
  const shown = host === '0.0.0.0' || host === '::' ? os.hostname() : host.includes(':') ? `[${host}]` : host;
  return `nbd${tls ? 's' : ''}://${shown}:${port}/${encodeURIComponent(name)}`;
}

/** Resolves on the first SIGINT/SIGTERM; a second SIGINT ends the process at once. */
function waitForSignal(log: (m: string) => void): Promise<void> {
  return new Promise((resolve) => {
    let stopping = false;
    const onSignal = (signal: NodeJS.Signals) => {
      if (stopping) {
        if (signal === 'SIGINT') process.exit(130);
        return;
      }
      stopping = true;
      log(`${signal}: finishing running requests (SIGINT again to quit at once)`);
      resolve();
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  });
}
