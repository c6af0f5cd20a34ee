/**
 * How the NBD server receives requests: on a plain socket it reads into memory of its own
 * (a reusable receive buffer, or straight into the rest of a large WRITE payload) instead
 * of a fresh buffer per read. These tests check that this Node lets it, and that requests
 * arriving cut at every kind of boundary, or pipelined past the flow-control limits, are
 * parsed and written exactly.
 */
import test, { type ExecutionContext } from 'ava';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import '../providers';
import { NbdServer } from '../core/nbd';
import { readDirectly } from '../core/nbd/direct-reads';
import { Opener } from '../core/open';
import { Vbd } from '../core/vbd';
import { RawClient } from './helpers/raw-nbd';

const KiB = 1024;
const MiB = 1024 * KiB;
const CMD = { READ: 0, WRITE: 1 };

async function pair(t: ExecutionContext): Promise<{ client: net.Socket; accepted: net.Socket }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-recv-'));
  const socketPath = path.join(dir, 's');
  const server = net.createServer();
  const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  const client = net.connect(socketPath);
  const socket = await accepted;
  t.teardown(() => {
    client.destroy();
    socket.destroy();
    server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return { client, accepted: socket };
}

test('readDirectly: this Node reads an accepted socket into the buffers we pick', async (t) => {
  const { client, accepted } = await pair(t);
  const general = Buffer.alloc(64);
  const target = Buffer.alloc(10);
  const got: Buffer[] = [];
  const landedIn: string[] = [];
  // The read after the first one goes to `target` (exactly its size), the rest to `general`.
  let reads = 0;
  let firstRead!: () => void;
  const first = new Promise<void>((resolve) => (firstRead = resolve));
  const done = new Promise<void>((resolve) => {
    t.true(
      readDirectly(accepted, {
        next: () => (reads === 1 ? target : general),
        received: (n, buf) => {
          reads++;
          got.push(Buffer.from(buf.subarray(0, n)));
          landedIn.push(buf === target ? 'target' : buf === general ? 'general' : 'elsewhere');
          if (reads === 1) firstRead();
          if (Buffer.concat(got).length === 3 + 10 + 5) resolve();
        },
      }),
      'switched to our buffers',
    );
  });
  let dataEvents = 0;
  accepted.on('data', () => dataEvents++);
  // Three bytes land in the general buffer; then 15 bytes at once: the read into `target`
  // takes exactly its 10, the next read the other 5.
  client.write(Buffer.from('xyz'));
  await first;
  client.write(Buffer.from('AAAAAAAAAAtail!'));
  await done;
  t.is(Buffer.concat(got).toString(), 'xyzAAAAAAAAAAtail!');
  t.is(target.toString(), 'AAAAAAAAAA');
  t.deepEqual(landedIn, ['general', 'target', 'general']);
  t.is(dataEvents, 0, "no 'data' events once switched");
  // A socket already switched is left alone.
  t.false(readDirectly(accepted, { next: () => general, received: () => {} }));
});

/** An in-process server of a fresh memory disk on a Unix socket, and a raw client in transmission (simple replies). */
async function serveMemory(t: ExecutionContext, size: string): Promise<RawClient> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-recv-'));
  const vbd = new Vbd(await new Opener().open(`memory:${size}`));
  const server = new NbdServer({ exports: [{ name: '', vbd }] });
  await server.listen({ path: path.join(dir, 'nbd.sock') });
  const client = await RawClient.connect({ path: path.join(dir, 'nbd.sock') });
  t.teardown(async () => {
    client.destroy();
    await server.close();
    await vbd.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  await client.greet();
  await client.go('');
  return client;
}

function request(type: number, offset: number, length: number, cookie: number, payload?: Buffer): Buffer {
  const header = Buffer.alloc(28);
  header.writeUInt32BE(0x25609513, 0);
  header.writeUInt16BE(type, 6);
  header.writeBigUInt64BE(BigInt(cookie), 8);
  header.writeBigUInt64BE(BigInt(offset), 16);
  header.writeUInt32BE(length, 24);
  return payload ? Buffer.concat([header, payload]) : header;
}

/** Reads `count` simple replies in any order; READ data (of the lengths in `reads`) by cookie. */
async function replies(t: ExecutionContext, client: RawClient, count: number, reads: Map<number, number>): Promise<Map<number, Buffer>> {
  const data = new Map<number, Buffer>();
  for (let i = 0; i < count; i++) {
    const reply = await client.readSimpleReply();
    t.is(reply.error, 0, `request ${reply.cookie} failed`);
    const cookie = Number(reply.cookie);
    const length = reads.get(cookie);
    if (length !== undefined) data.set(cookie, Buffer.from(await client.read(length)));
  }
  return data;
}

test('requests cut anywhere: inside headers, inside large and small payloads, across both', async (t) => {
  const client = await serveMemory(t, '64M');
  const big = crypto.randomBytes(MiB + 7);
  const small = crypto.randomBytes(4 * KiB);
  const medium = crypto.randomBytes(300 * KiB);
  const stream = Buffer.concat([
    request(CMD.WRITE, 5 * MiB + 3, big.length, 1, big),
    request(CMD.WRITE, 100, small.length, 2, small),
    request(CMD.WRITE, 20 * MiB - 1, medium.length, 3, medium),
  ]);
  // The first large header with a few payload bytes, then the rest in pieces of every size,
  // each given time to arrive on its own.
  const cuts = [28 + 1000, 28 + 1000 + 1, 28 + 70_000, MiB, MiB + 28 + 7 + 10, MiB + 28 + 7 + 28 + 2, MiB + 2 * 28 + 7 + 4 * KiB + 5];
  for (let at = cuts[cuts.length - 1] + 1; at < stream.length; at += 1 + Math.floor(Math.random() * 90_000)) cuts.push(at);
  let from = 0;
  for (const cut of [...cuts, stream.length]) {
    client.write(stream.subarray(from, cut));
    from = cut;
    await new Promise((r) => setTimeout(r, 2));
  }
  await replies(t, client, 3, new Map());
  client.write(Buffer.concat([request(CMD.READ, 5 * MiB + 3, big.length, 4), request(CMD.READ, 0, 8 * KiB, 5), request(CMD.READ, 20 * MiB - 1, medium.length, 6)]));
  const data = await replies(t, client, 3, new Map([[4, big.length], [5, 8 * KiB], [6, medium.length]]));
  t.true(data.get(4)!.equals(big), 'the large write');
  t.true(data.get(5)!.subarray(100, 100 + small.length).equals(small), 'the small write');
  t.true(data.get(5)!.subarray(0, 100).equals(Buffer.alloc(100)), 'nothing else written');
  t.true(data.get(6)!.equals(medium), 'the medium write');
});

test('a burst past the in-flight limit: unparsed bytes are kept until there is room', async (t) => {
  const client = await serveMemory(t, '256M');
  // 300 writes in one go, more than the 64 a connection runs at once, small and large,
  // each to its own 512 KiB slot so that none overlaps another.
  const slot = 512 * KiB;
  const written: Buffer[] = [];
  const parts: Buffer[] = [];
  for (let i = 0; i < 300; i++) {
    const payload = crypto.randomBytes(i % 3 === 0 ? 200 * KiB + i : 4 * KiB - i);
    written.push(payload);
    parts.push(request(CMD.WRITE, i * slot + (i % 512), payload.length, i + 1, payload));
  }
  client.write(Buffer.concat(parts));
  await replies(t, client, 300, new Map());
  const reads = new Map<number, number>();
  const readParts: Buffer[] = [];
  for (let i = 0; i < 300; i++) {
    reads.set(1000 + i, written[i].length);
    readParts.push(request(CMD.READ, i * slot + (i % 512), written[i].length, 1000 + i));
  }
  client.write(Buffer.concat(readParts));
  const data = await replies(t, client, 300, reads);
  const wrong = written.map((w, i) => (data.get(1000 + i)!.equals(w) ? -1 : i)).filter((i) => i >= 0);
  t.deepEqual(wrong, [], 'every write read back');
});
