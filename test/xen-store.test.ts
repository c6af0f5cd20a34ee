/**
 * The sim platform's XenStore daemon (XENSIM.md "D/xenstored.sock" and settled detail
 * 14): Xen's own xenstore-* tools against it, then the wire protocol byte by byte —
 * errors by name, watches, transactions, malformed and random input that closes one
 * connection only.
 */
import test, { type ExecutionContext } from 'ava';
import * as fc from 'fast-check';
import { spawn } from 'node:child_process';
import * as net from 'node:net';
import * as path from 'node:path';
import { SimPlatform } from '../core/ring/sim/platform';
import { DEFAULT_NODES_PER_DOMAIN } from '../core/ring/sim/store';
import { MAX_BACKLOG, MAX_TRANSACTIONS, MAX_WATCHES } from '../core/ring/sim/xenstored';
import { encodeMessage, MessageReader, nulTerminated, splitArgs, XS, type XsMessage } from '../core/ring/sim/xs-wire';
import { mustRun } from './helpers/run';
import { tempDir } from './helpers/temp';


async function platform(t: ExecutionContext): Promise<{ dir: string; sim: SimPlatform; env: NodeJS.ProcessEnv }> {
  const dir = tempDir(t, 'tapkit-xs-');
  const sim = await SimPlatform.start(dir);
  t.teardown(async () => {
    await sim.close();
  });
  return { dir, sim, env: { ...process.env, XENSTORED_PATH: path.join(dir, 'xenstored.sock') } };
}

function tool(env: NodeJS.ProcessEnv, name: string, ...args: string[]) {
  return mustRun(name, args, { env, timeoutMs: 10_000 });
}

/** A raw wire connection: send messages, read what comes back. */
class Wire {
  private readonly reader = new MessageReader();
  readonly received: XsMessage[] = [];
  private wake?: () => void;
  closed = false;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.received.push(...this.reader.push(chunk));
      this.wake?.();
    });
    socket.on('error', () => undefined);
    socket.on('close', () => {
      this.closed = true;
      this.wake?.();
    });
  }

  static connect(dir: string): Promise<Wire> {
    return new Promise((resolve, reject) => {
      const s = net.connect(path.join(dir, 'xenstored.sock'));
      s.once('error', reject);
      s.once('connect', () => resolve(new Wire(s)));
    });
  }

  send(type: number, payload: Buffer, reqId = 1, txId = 0): void {
    this.socket.write(encodeMessage({ type, reqId, txId, payload }));
  }

  /** Waits (bounded) until `n` messages have arrived, or the connection closed. */
  async waitFor(n: number, timeoutMs = 30_000): Promise<XsMessage[]> {
    const deadline = Date.now() + timeoutMs;
    while (this.received.length < n && !this.closed && Date.now() < deadline) {
      await new Promise<void>((r) => {
        this.wake = r;
        setTimeout(r, 50);
      });
    }
    return this.received.slice(0, n);
  }

  async call(type: number, payload: Buffer, txId = 0): Promise<{ type: number; args: string[]; payload: Buffer }> {
    const before = this.received.length;
    this.send(type, payload, before + 1, txId);
    const [m] = (await this.waitFor(before + 1)).slice(before);
    if (!m) throw new Error('no reply');
    return { type: m.type, args: splitArgs(m.payload), payload: m.payload };
  }

  close(): void {
    this.socket.destroy();
  }
}

test('xenstore-write, -read, -ls -p, -list, -exists, -chmod, -rm work against the sim daemon', async (t) => {
  const { env } = await platform(t);
  await tool(env, 'xenstore-write', '/a/b/c', 'hello', '/a/d', '2');
  t.is((await tool(env, 'xenstore-read', '/a/b/c')).stdout.trim(), 'hello');
  t.deepEqual((await tool(env, 'xenstore-list', '/a')).stdout.trim().split('\n'), ['b', 'd']);
  await t.throwsAsync(tool(env, 'xenstore-exists', '/a/zz'));
  await tool(env, 'xenstore-exists', '/a/b');
  await tool(env, 'xenstore-chmod', '/a/d', 'r5', 'w6');
  t.regex((await tool(env, 'xenstore-ls', '-p', '/a')).stdout, /d = "2".*\(r5,w6\)/);
  await tool(env, 'xenstore-rm', '/a/b');
  t.is((await tool(env, 'xenstore-ls', '/a')).stdout.trim(), 'd = "2"');
  const e = await t.throwsAsync(tool(env, 'xenstore-read', '/nope'));
  t.regex(String((e as { stderr?: string }).stderr), /couldn't read path \/nope/);
});

test('xenstore-watch sees the watch fire once when set and then on a change below it', async (t) => {
  const { env, sim } = await platform(t);
  await sim.store.write('/w/x', '1');
  const child = spawn('xenstore-watch', ['-n', '2', '/w'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
  t.teardown(() => {
    clearTimeout(timer);
    child.kill('SIGKILL');
  });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  for (const deadline = Date.now() + 30_000; !out.includes('/w') && Date.now() < deadline; ) await new Promise((r) => setTimeout(r, 20));
  t.regex(out, /\/w/, 'the first event arrived');
  await sim.store.write('/w/x/y', '2');
  const code = await new Promise((r) => child.on('close', r));
  t.is(code, 0);
  t.deepEqual(out.trim().split('\n'), ['/w', '/w/x/y']);
});

test('wire: errors by name; RM of a missing node with a parent succeeds; GET_DOMAIN_PATH; relative paths are under domain 0', async (t) => {
  const { dir } = await platform(t);
  const w = await Wire.connect(dir);
  t.teardown(() => w.close());
  t.deepEqual(await w.call(XS.READ, nulTerminated('/missing')), { type: XS.ERROR, args: ['ENOENT'], payload: nulTerminated('ENOENT') });
  t.deepEqual((await w.call(XS.READ, nulTerminated('bad//path'))).args, ['EINVAL']);
  t.deepEqual((await w.call(XS.WRITE, Buffer.from('no-nul-here'))).args, ['EINVAL']);
  t.deepEqual((await w.call(99, nulTerminated('x'))).args, ['ENOSYS']);
  t.deepEqual((await w.call(XS.INTRODUCE, nulTerminated('1', '2', '3'))).args, ['ENOSYS']);
  t.deepEqual((await w.call(XS.WRITE, Buffer.concat([nulTerminated('rel/key'), Buffer.from('v')]))).args, ['OK']);
  t.is((await w.call(XS.READ, nulTerminated('/local/domain/0/rel/key'))).payload.toString(), 'v');
  t.deepEqual((await w.call(XS.RM, nulTerminated('/local/domain/0/rel/nothing'))).args, ['OK']);
  t.deepEqual((await w.call(XS.RM, nulTerminated('/no/parent/here'))).args, ['ENOENT']);
  t.deepEqual((await w.call(XS.GET_DOMAIN_PATH, nulTerminated('7'))).args, ['/local/domain/7']);
  t.deepEqual((await w.call(XS.MKDIR, nulTerminated('/m/n'))).args, ['OK']);
  t.deepEqual((await w.call(XS.DIRECTORY, nulTerminated('/m'))).args, ['n']);
  t.deepEqual((await w.call(XS.TRANSACTION_END, nulTerminated('T'), 4242)).args, ['ENOENT']);
});

test('wire: the first WATCH_EVENT follows the WATCH reply; removing a node fires the watches on it and below; UNWATCH and RESET_WATCHES stop them', async (t) => {
  const { dir, sim } = await platform(t);
  await sim.store.write('/p/q/r', '1');
  const w = await Wire.connect(dir);
  t.teardown(() => w.close());
  w.send(XS.WATCH, nulTerminated('/p/q/r', 'deep'), 1);
  const [reply, first] = await w.waitFor(2);
  t.is(reply.type, XS.WATCH);
  t.deepEqual([first.type, ...splitArgs(first.payload)], [XS.WATCH_EVENT, '/p/q/r', 'deep']);
  w.send(XS.WATCH, nulTerminated('/p', 'top'), 2);
  await w.waitFor(4);
  await sim.store.rm('/p/q');
  const events = (await w.waitFor(6)).slice(4).map((m) => splitArgs(m.payload).join(' '));
  t.deepEqual(events.sort(), ['/p/q top', '/p/q/r deep']);
  t.deepEqual((await w.call(XS.UNWATCH, nulTerminated('/p', 'top'))).args, ['OK']);
  t.deepEqual((await w.call(XS.UNWATCH, nulTerminated('/p', 'top'))).args, ['ENOENT']);
  t.deepEqual((await w.call(XS.RESET_WATCHES, Buffer.alloc(0))).args, ['OK']);
  const count = w.received.length;
  await sim.store.write('/p/q/r', '2');
  await new Promise((r) => setTimeout(r, 200));
  t.is(w.received.length, count, 'no event after RESET_WATCHES');
});

test('wire: a transaction that read a node changed since it started ends EAGAIN and changes nothing; one without conflict commits', async (t) => {
  const { dir, sim } = await platform(t);
  await sim.store.write('/t/a', '1');
  const w = await Wire.connect(dir);
  t.teardown(() => w.close());
  const tx = Number((await w.call(XS.TRANSACTION_START, nulTerminated(''))).args[0]);
  t.true(tx > 0);
  t.is((await w.call(XS.READ, nulTerminated('/t/a'), tx)).payload.toString(), '1');
  await w.call(XS.WRITE, Buffer.concat([nulTerminated('/t/b'), Buffer.from('from-tx')]), tx);
  await sim.store.write('/t/a', '2'); // a change the transaction read
  t.deepEqual((await w.call(XS.TRANSACTION_END, nulTerminated('T'), tx)).args, ['EAGAIN']);
  t.is(await sim.store.read('/t/b'), undefined, 'nothing of the conflicting transaction applied');
  const tx2 = Number((await w.call(XS.TRANSACTION_START, nulTerminated(''))).args[0]);
  await w.call(XS.WRITE, Buffer.concat([nulTerminated('/t/b'), Buffer.from('again')]), tx2);
  t.is(await sim.store.read('/t/b'), undefined, 'not visible before commit');
  t.deepEqual((await w.call(XS.TRANSACTION_END, nulTerminated('T'), tx2)).args, ['OK']);
  t.is(await sim.store.read('/t/b'), 'again');
  const tx3 = Number((await w.call(XS.TRANSACTION_START, nulTerminated(''))).args[0]);
  await w.call(XS.WRITE, Buffer.concat([nulTerminated('/t/c'), Buffer.from('x')]), tx3);
  t.deepEqual((await w.call(XS.TRANSACTION_END, nulTerminated('F'), tx3)).args, ['OK']);
  t.is(await sim.store.read('/t/c'), undefined, 'an aborted transaction changes nothing');
});

test('wire: open transactions and watches are limited per connection (EQUOTA); ending one makes room', async (t) => {
  const { dir } = await platform(t);
  const w = await Wire.connect(dir);
  t.teardown(() => w.close());
  const ids: number[] = [];
  for (let i = 0; i < MAX_TRANSACTIONS; i++) ids.push(Number((await w.call(XS.TRANSACTION_START, nulTerminated(''))).args[0]));
  t.deepEqual((await w.call(XS.TRANSACTION_START, nulTerminated(''))).args, ['EQUOTA']);
  t.deepEqual((await w.call(XS.TRANSACTION_END, nulTerminated('F'), ids[0])).args, ['OK']);
  t.true(Number((await w.call(XS.TRANSACTION_START, nulTerminated(''))).args[0]) > 0);
  const other = await Wire.connect(dir);
  t.teardown(() => other.close());
  t.true(Number((await other.call(XS.TRANSACTION_START, nulTerminated(''))).args[0]) > 0, 'the quota is per connection');
  const before = w.received.length;
  for (let i = 0; i < MAX_WATCHES; i++) w.send(XS.WATCH, nulTerminated(`/q${i}`, 'tok'), 10_000 + i);
  // Each watch answers its reply and then its first event.
  const answered = await w.waitFor(before + 2 * MAX_WATCHES, 20_000);
  t.is(answered.slice(before).filter((m) => m.type === XS.WATCH).length, MAX_WATCHES);
  const r = await w.call(XS.WATCH, nulTerminated('/one-more', 'tok'));
  t.deepEqual(r.args, ['EQUOTA']);
});

test('wire: a guest domain\'s nodes are limited (EQUOTA, nothing created); other domains, dom0 and the connection go on; removing makes room', async (t) => {
  const { dir, sim } = await platform(t);
  const hostile = await Wire.connect(dir);
  t.teardown(() => hostile.close());
  const write = (w: Wire, p: string, v: string, tx = 0) => w.call(XS.WRITE, Buffer.concat([nulTerminated(p), Buffer.from(v)]), tx).then((r) => r.args[0]);
  // /local/domain/7 and /local/domain/7/junk count too.
  let written = 0;
  let answer = '';
  for (; written < 2 * DEFAULT_NODES_PER_DOMAIN; written++) {
    answer = await write(hostile, `/local/domain/7/junk/n${written}`, 'x');
    if (answer !== 'OK') break;
  }
  t.is(answer, 'EQUOTA');
  t.is(written, DEFAULT_NODES_PER_DOMAIN - 2);
  t.is(await sim.store.read(`/local/domain/7/junk/n${written}`), undefined, 'the refused node was not created');
  t.is(await write(hostile, '/local/domain/7/deeper/a/b', 'x'), 'EQUOTA', 'no missing parent is created either');
  t.deepEqual(await sim.store.directory('/local/domain/7'), ['junk']);
  t.is(await write(hostile, '/local/domain/7/junk/n0', 'rewritten'), 'OK', 'rewriting a node it holds still works');
  // Nothing else is charged: another guest, dom0's backend area, the same connection.
  t.is(await write(hostile, '/local/domain/8/device/vbd/51712/state', '1'), 'OK');
  t.is(await write(hostile, '/local/domain/0/backend/vbd/7/51712/state', '1'), 'OK');
  const other = await Wire.connect(dir);
  t.teardown(() => other.close());
  t.is(await write(other, '/local/domain/9/x', 'y'), 'OK');
  // Inside a transaction the write is refused at once; the commit applies what was allowed.
  const tx = Number((await hostile.call(XS.TRANSACTION_START, nulTerminated(''))).args[0]);
  t.is(await write(hostile, '/local/domain/7/in-tx', 'x', tx), 'EQUOTA');
  t.is(await write(hostile, '/local/domain/8/in-tx', 'x', tx), 'OK');
  t.deepEqual((await hostile.call(XS.TRANSACTION_END, nulTerminated('T'), tx)).args, ['OK']);
  t.is(await sim.store.read('/local/domain/8/in-tx'), 'x');
  // Removing nodes makes room again.
  t.deepEqual((await hostile.call(XS.RM, nulTerminated('/local/domain/7/junk/n1'))).args, ['OK']);
  t.is(await write(hostile, '/local/domain/7/junk/again', 'x'), 'OK');
  // A transaction whose new node was allowed when written, but not any more at its
  // commit (another write took the last place meanwhile), commits nothing.
  t.deepEqual((await hostile.call(XS.RM, nulTerminated('/local/domain/7/junk/n2'))).args, ['OK']);
  const late = Number((await hostile.call(XS.TRANSACTION_START, nulTerminated(''))).args[0]);
  t.is(await write(hostile, '/local/domain/7/late', 'x', late), 'OK');
  t.is(await write(hostile, '/local/domain/8/late', 'x', late), 'OK');
  t.is(await write(other, '/local/domain/7/junk/first', 'x'), 'OK');
  t.deepEqual((await hostile.call(XS.TRANSACTION_END, nulTerminated('T'), late)).args, ['EQUOTA']);
  t.is(await sim.store.read('/local/domain/7/late'), undefined);
  t.is(await sim.store.read('/local/domain/8/late'), undefined, 'all or nothing');
});

test('wire: a client that watches and never reads is cut off past its backlog; the daemon and other clients go on', async (t) => {
  const { dir, sim } = await platform(t);
  const lazy = await Wire.connect(dir);
  lazy.send(XS.WATCH, nulTerminated('/flood', 'tok'));
  await lazy.waitFor(2);
  lazy.socket.pause();
  const good = await Wire.connect(dir);
  t.teardown(() => good.close());
  for (let i = 0; i < (4 * MAX_BACKLOG) / 32 && !lazy.closed; i++) {
    await sim.store.write(`/flood/n${i}`, 'x');
    if (i % 1000 === 0) await new Promise((r) => setImmediate(r));
  }
  lazy.socket.resume();
  await lazy.waitFor(1e9, 30_000);
  t.true(lazy.closed, 'the lazy client was disconnected');
  t.deepEqual((await good.call(XS.WRITE, Buffer.concat([nulTerminated('/after'), Buffer.from('ok')]))).args, ['OK']);
});

test('wire: an oversized header closes that connection only; random bytes never take the daemon down', async (t) => {
  const { dir, sim } = await platform(t);
  const good = await Wire.connect(dir);
  t.teardown(() => good.close());
  const bad = await Wire.connect(dir);
  const header = Buffer.alloc(16);
  header.writeUInt32LE(XS.WRITE, 0);
  header.writeUInt32LE(1 << 20, 12);
  bad.socket.write(header);
  await bad.waitFor(1);
  t.true(bad.closed, 'the connection that sent a 1 MiB payload header is closed');
  await fc.assert(
    fc.asyncProperty(fc.uint8Array({ minLength: 1, maxLength: 600 }), async (bytes) => {
      const w = await Wire.connect(dir);
      w.socket.write(bytes);
      await new Promise((r) => setTimeout(r, 5));
      w.close();
      return true;
    }),
    { numRuns: 60 },
  );
  t.deepEqual((await good.call(XS.WRITE, Buffer.concat([nulTerminated('/still'), Buffer.from('here')]))).args, ['OK']);
  t.is(await sim.store.read('/still'), 'here');
});

// ---- the event-channel socket (XENSIM.md "D/evtchn.sock", settled details 6 and 7) ----

function evtConnect(dir: string, domid: number): Promise<{ socket: net.Socket; ports: number[]; closed: () => boolean }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(path.join(dir, 'evtchn.sock'));
    const ports: number[] = [];
    let pending = Buffer.alloc(0);
    let closed = false;
    socket.on('data', (chunk: Buffer) => {
      pending = Buffer.concat([pending, chunk]);
      for (; pending.length >= 4; pending = pending.subarray(4)) ports.push(pending.readUInt32LE(0));
    });
    socket.on('close', () => (closed = true));
    socket.once('error', reject);
    socket.once('connect', () => {
      const hello = Buffer.alloc(4);
      hello.writeUInt32LE(domid);
      socket.write(hello);
      resolve({ socket, ports, closed: () => closed });
    });
  });
}

const u32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n);
  return b;
};
const settle = (ms = 100) => new Promise((r) => setTimeout(r, ms));
/** Waits (bounded) until `cond` holds; the machine may be slow, so no fixed delays for positive checks. */
async function until(cond: () => boolean, ms = 30_000): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (!cond() && Date.now() < deadline) await settle(20);
  return cond();
}

test('evtchn: a bound port carries notifications both ways; unbound ports, port 0 and domain 0 are refused', async (t) => {
  const { dir, sim } = await platform(t);
  let heard = 0;
  const channel = sim.events.bind(5, 10, () => heard++);
  t.throws(() => sim.events.bind(5, 0, () => undefined));
  t.throws(() => sim.events.bind(0, 3, () => undefined));
  t.throws(() => sim.events.bind(5, 10, () => undefined), undefined, 'bound twice');
  const guest = await evtConnect(dir, 5);
  t.teardown(() => guest.socket.destroy());
  guest.socket.write(Buffer.concat([u32(10), u32(11), u32(0)]));
  t.true(await until(() => heard === 1), 'port 10 heard');
  await settle();
  t.is(heard, 1, 'port 11 (unbound) and port 0 dropped');
  channel.notify();
  t.true(await until(() => guest.ports.length > 0));
  t.deepEqual(guest.ports, [10]);
  channel.close();
  guest.socket.write(u32(10));
  await settle();
  t.is(heard, 1, 'nothing after the channel closed');
  const dom0 = await evtConnect(dir, 0);
  t.true(await until(() => dom0.closed()), 'a hello from domain 0 is refused');
});

test('evtchn: a second hello for a domain replaces the first connection; a client that never reads is cut off, others are not', async (t) => {
  const { dir, sim } = await platform(t);
  const first = await evtConnect(dir, 6);
  // The hub has taken the first hello when a notification reaches it.
  const probe = sim.events.bind(6, 99, () => undefined);
  t.true(await until(() => (probe.notify(), first.ports.length > 0)));
  probe.close();
  const second = await evtConnect(dir, 6);
  t.teardown(() => second.socket.destroy());
  t.true(await until(() => first.closed()), 'the older connection of domain 6 was closed');
  t.false(second.closed());
  const channels = Array.from({ length: 1000 }, (_, i) => sim.events.bind(7, i + 1, () => undefined));
  const lazy = await evtConnect(dir, 7);
  // Wait until the hub knows domain 7 (a notification arrives), then stop reading.
  t.true(await until(() => (channels[0].notify(), lazy.ports.length > 0)));
  lazy.socket.pause();
  const other = sim.events.bind(6, 1, () => undefined);
  for (let round = 0; round < 5000 && !lazy.closed(); round++) {
    for (const c of channels) c.notify();
    await new Promise((r) => setImmediate(r));
  }
  lazy.socket.resume();
  t.true(await until(() => lazy.closed()), 'the client with an unread backlog was disconnected');
  other.notify();
  t.true(await until(() => second.ports.length > 0));
  t.deepEqual(second.ports, [1], 'another domain still hears its notifications');
});
