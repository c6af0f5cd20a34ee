/**
 * `tapkit xen qemu-stub`: tapkit in QEMU's place as a PV guest's "device model", so that
 * `xl` with `backendtype=qdisk` disks and `device_model_override` hands the disks to
 * tapkit (docs/xen-lab.md "qdisk"). What libxl 4.17 expects of the device model it
 * spawns for a PV guest (libxl_dm.c, libxl_qmp.c), and what this does:
 *
 *  - arguments as for QEMU: `-xen-domid N`, `-chardev socket,id=libxl-cmd,path=P,server=on,wait=off`
 *    (or `fd=N` when libxl opened the socket, with `-S`), a second QMP chardev for
 *    libxenstat, `-mon ...`, `-machine xenpv`, ... Only the domain, the chardev sockets
 *    and `-S` matter here; the rest is accepted and ignored;
 *  - the disks: libxl wrote `backend/qdisk/N/DEVID` (params `FORMAT:PATH` in QEMU's format
 *    names) before spawning; the stub serves those of domain N only;
 *  - readiness: `/local/domain/0/device-model/N/state` = `running` in XenStore (libxl waits
 *    up to 60 s for it). With `-S` libxl asks `query-status` for `prelaunch` instead, then
 *    `cont`;
 *  - QMP (JSON lines): a greeting with a QEMU version, `qmp_capabilities`, then libxl sends
 *    `query-chardev` (answered: no chardevs, so no serial ttys to record), `query-vnc` when a
 *    VNC display is configured (answered: disabled), `query-status`, `cont`, `quit`; anything
 *    else answers CommandNotFound;
 *  - teardown: libxl kills the device model's pid (SIGHUP/SIGTERM/SIGKILL): the stub then
 *    stops its devices (each goes to Closed) and exits.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import { BlkifBackend, type BackendOptions } from './backend';
import type { Platform } from './platform';

export interface QemuArguments {
  domid: number;
  /** QMP sockets to listen on (`path=`), or ones libxl opened for us (`fd=`). */
  qmp: Array<{ path: string } | { fd: number }>;
  /** `-S`: start "paused" (libxl then checks `prelaunch` and sends `cont`). */
  paused: boolean;
  name?: string;
}

/** Reads the QEMU command line libxl builds; refuses one without `-xen-domid`. */
export function parseQemuArguments(args: string[]): QemuArguments {
  let domid: number | undefined;
  const qmpChardevs = new Map<string, { path: string } | { fd: number }>();
  const monitors: string[] = [];
  let paused = false;
  let name: string | undefined;
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    const value = () => {
      const v = args[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    switch (a.replace(/^--/, '-')) {
      case '-xen-domid': {
        const v = value();
        if (!/^\d+$/.test(v) || Number(v) < 1 || Number(v) > 0x7fef) throw new Error(`-xen-domid '${v}' is not a guest domain`);
        domid = Number(v);
        break;
      }
      case '-chardev': {
        const fields = new Map(value().split(',').map((kv) => [kv.split('=')[0], kv.slice(kv.indexOf('=') + 1)] as [string, string]));
        const id = fields.get('id');
        if (!id) break;
        if (fields.has('path')) qmpChardevs.set(id, { path: fields.get('path')! });
        else if (fields.has('fd')) qmpChardevs.set(id, { fd: Number(fields.get('fd')) });
        break;
      }
      case '-mon': {
        const fields = new Map(value().split(',').map((kv) => [kv.split('=')[0], kv.slice(kv.indexOf('=') + 1)] as [string, string]));
        if (fields.get('mode') === 'control' && fields.get('chardev')) monitors.push(fields.get('chardev')!);
        break;
      }
      case '-S':
        paused = true;
        break;
      case '-name':
        name = value();
        break;
      default:
        // Options with a value: skip it so it is not read as an option.
        if (/^-(machine|M|m|smp|vnc|display|nodefaults|no-shutdown|xen-attach|device|drive|netdev|vga|serial|monitor|global|boot|k|sdl|spice|chroot|runas|incoming|trace|D)$/.test(a)) {
          if (!['-nodefaults', '-no-shutdown', '-xen-attach'].includes(a)) i++;
        }
    }
  }
  if (domid === undefined) throw new Error('no -xen-domid: not started by libxl as a device model?');
  const qmp = monitors.map((m) => qmpChardevs.get(m)).filter((c): c is { path: string } | { fd: number } => !!c);
  return { domid, qmp, paused, name };
}

/** The QEMU version the greeting announces (libxl only records it). */
const ANNOUNCED_VERSION = { major: 7, minor: 2, micro: 0 };

type QmpReply = { return: unknown } | { error: { class: string; desc: string } };

/** Splits a byte stream into top-level JSON objects (QMP puts one per line; libxl ends with CRLF). */
export class JsonObjectSplitter {
  private text = '';
  push(chunk: string): unknown[] {
    this.text += chunk;
    const out: unknown[] = [];
    let depth = 0;
    let inString = false;
    let escaped = false;
    let start = -1;
    let consumed = 0;
    for (let i = 0; i < this.text.length; i++) {
      const c = this.text[i];
      if (inString) {
        if (escaped) escaped = false;
        else if (c === '\\') escaped = true;
        else if (c === '"') inString = false;
        continue;
      }
      if (c === '"') inString = true;
      else if (c === '{') {
        if (depth++ === 0) start = i;
      } else if (c === '}' && depth > 0 && --depth === 0) {
        out.push(JSON.parse(this.text.slice(start, i + 1)));
        consumed = i + 1;
      }
    }
    this.text = depth === 0 ? '' : this.text.slice(Math.max(consumed, start));
    if (this.text.length > 1 << 20) throw new Error('QMP message over 1 MiB');
    return out;
  }
}

export class QemuStub {
  private readonly servers: net.Server[] = [];
  private readonly sockets = new Set<net.Socket>();
  private backend?: BlkifBackend;
  private status: 'prelaunch' | 'running';
  private stopping?: Promise<void>;
  /** Resolves when the stub should exit (`quit`). */
  readonly quit: Promise<void>;
  private onQuit!: () => void;

  constructor(
    private readonly platform: Platform,
    private readonly args: QemuArguments,
    private readonly backendOptions: Omit<BackendOptions, 'platform' | 'type' | 'domid'>,
  ) {
    this.status = args.paused ? 'prelaunch' : 'running';
    this.quit = new Promise((resolve) => (this.onQuit = resolve));
  }

  private get statePath(): string {
    return `/local/domain/0/device-model/${this.args.domid}/state`;
  }

  private log(message: string): void {
    this.backendOptions.log?.(`qemu-stub ${this.args.domid}: ${message}`);
  }

  /** Serves the domain's qdisk devices, opens the QMP sockets, then tells libxl it runs. */
  async start(): Promise<void> {
    this.backend = new BlkifBackend({ ...this.backendOptions, platform: this.platform, type: 'qdisk', domid: this.args.domid });
    await this.backend.start();
    for (const q of this.args.qmp) this.servers.push(await this.listen(q));
    if (this.status === 'running') await this.platform.store.write(this.statePath, 'running');
    this.log(`serving backend/qdisk/${this.args.domid}, ${this.args.qmp.length} QMP socket(s)${this.args.paused ? ', paused until cont' : ''}`);
  }

  private listen(where: { path: string } | { fd: number }): Promise<net.Server> {
    const server = net.createServer((socket) => this.serveQmp(socket));
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      const ready = () => {
        server.off('error', reject);
        resolve(server);
      };
      if ('path' in where) {
        fs.rmSync(where.path, { force: true });
        server.listen(where.path, ready);
      } else server.listen({ fd: where.fd }, ready);
    });
  }

  private serveQmp(socket: net.Socket): void {
    this.sockets.add(socket);
    socket.on('close', () => this.sockets.delete(socket));
    socket.on('error', () => socket.destroy());
    const send = (message: unknown) => socket.write(`${JSON.stringify(message)}\r\n`);
    send({ QMP: { version: { qemu: ANNOUNCED_VERSION, package: ' (tapkit qemu-stub)' }, capabilities: [] } });
    const splitter = new JsonObjectSplitter();
    let chain = Promise.resolve();
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      let messages: unknown[];
      try {
        messages = splitter.push(chunk);
      } catch (e) {
        send({ error: { class: 'GenericError', desc: (e as Error).message } });
        socket.destroy();
        return;
      }
      for (const m of messages) {
        chain = chain.then(async () => {
          const { execute, id } = (m ?? {}) as { execute?: unknown; id?: unknown };
          const reply = await this.execute(typeof execute === 'string' ? execute : '');
          send(id === undefined ? reply : { ...reply, id });
        });
      }
    });
  }

  private async execute(command: string): Promise<QmpReply> {
    switch (command) {
      case 'qmp_capabilities':
        return { return: {} };
      case 'query-status':
        return { return: { status: this.status, running: this.status === 'running', singlestep: false } };
      case 'cont':
        if (this.status !== 'running') {
          this.status = 'running';
          await this.platform.store.write(this.statePath, 'running');
        }
        return { return: {} };
      case 'query-chardev':
        return { return: [] };
      case 'query-vnc':
        return { return: { enabled: false } };
      case 'quit':
        setImmediate(() => this.onQuit());
        return { return: {} };
      default:
        return { error: { class: 'CommandNotFound', desc: `The command ${command || '(none)'} has not been found (tapkit qemu-stub serves disks only)` } };
    }
  }

  /** Stops the devices (each goes to Closed) and closes the QMP sockets. */
  stop(): Promise<void> {
    return (this.stopping ??= (async () => {
      for (const s of this.sockets) s.destroy();
      await Promise.all(this.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
      for (const q of this.args.qmp) if ('path' in q) fs.rmSync(q.path, { force: true });
      await this.backend?.close();
    })());
  }
}
