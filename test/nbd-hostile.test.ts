/**
 * Hostile and broken clients, written byte by byte: each gets the protocol's error or a
 * clean disconnect of that client alone, and a good client (qemu-io) still works after it.
 * Also: bounded memory for a client that never reads its replies, and the connection limit.
 */
import test, { type ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import { TRANSPORTS, listenArgs, serve, sleep, type Served, type Transport } from './helpers/nbd';
import { RawClient, u16, u32 } from './helpers/raw-nbd';
import { must } from './helpers/run';

const MiB = 1024 * 1024;

function targetOf(uri: string): { path: string } | { host: string; port: number } {
  const unix = /[?&]socket=([^&]+)/.exec(uri);
  if (unix) return { path: decodeURIComponent(unix[1]) };
  const tcp = /^nbds?:\/\/([^:/]+):(\d+)\//.exec(uri)!;
  return { host: tcp[1], port: Number(tcp[2]) };
}

async function start(t: ExecutionContext, transport: Transport, extra: string[] = []): Promise<Served> {
  return serve(t, [...listenArgs(t, transport), ...extra, 'memory:64M']);
}

async function connect(t: ExecutionContext, server: Served): Promise<RawClient> {
  const client = await RawClient.connect(targetOf(server.uri));
  t.teardown(() => client.destroy());
  return client;
}

/** A real client still gets correct service. */
async function stillServes(t: ExecutionContext, server: Served): Promise<void> {
  const out = await must('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 12345 4096', '-c', 'read -P 0x42 12345 4096', server.uri]);
  t.regex(out, /read 4096\/4096 bytes/);
}

for (const transport of TRANSPORTS) {
  test(`bad option magic: disconnected, others unaffected (${transport})`, async (t) => {
    const server = await start(t, transport);
    const client = await connect(t, server);
    const greeting = await client.greet();
    t.is(greeting.toString('latin1', 0, 16), 'NBDMAGICIHAVEOPT');
    client.write(Buffer.concat([Buffer.from('IHAVEOPX'), u32(3), u32(0)]));
    t.true(await client.closedWithin(10_000));
    await stillServes(t, server);
  });

  test(`unknown client flags and truncated handshakes end only that client (${transport})`, async (t) => {
    const server = await start(t, transport);
    const flags = await connect(t, server);
    await flags.greet(0x80000001);
    t.true(await flags.closedWithin(10_000));
    // Half an option header, then gone; and half a greeting reply, then gone.
    const half = await connect(t, server);
    await half.greet();
    half.write(Buffer.concat([Buffer.from('IHAVEOPT'), u32(6)]));
    half.destroy();
    const early = await connect(t, server);
    await early.read(18);
    early.write(Buffer.from([0, 0]));
    early.destroy();
    await stillServes(t, server);
  });

  test(`option errors keep haggling; EXPORT_NAME of an unknown export disconnects (${transport})`, async (t) => {
    const server = await start(t, transport);
    const client = await connect(t, server);
    await client.greet();
    client.sendOption(42);
    t.is((await client.readOptionReply()).type, 0x80000001, 'ERR_UNSUP for an unknown option');
    client.sendOption(6, Buffer.concat([u32(1000), Buffer.from('x')]));
    t.is((await client.readOptionReply()).type, 0x80000003, 'ERR_INVALID for a name longer than the option');
    client.sendOption(6, Buffer.concat([u32(4), Buffer.from('nope'), u16(0)]));
    t.is((await client.readOptionReply()).type, 0x80000006, 'ERR_UNKNOWN for a missing export');
    client.sendOption(3, Buffer.from('junk'));
    t.is((await client.readOptionReply()).type, 0x80000003, 'ERR_INVALID for LIST with data');
    client.sendOption(10, Buffer.concat([u32(0), u32(1), u32(15), Buffer.from('base:allocation')]));
    t.is((await client.readOptionReply()).type, 0x80000003, 'SET_META_CONTEXT before STRUCTURED_REPLY');
    client.sendOption(5);
    t.is((await client.readOptionReply()).type, 0x80000002, 'STARTTLS without certificates is refused by policy');
    client.sendOption(1, Buffer.from('nope'));
    t.true(await client.closedWithin(10_000));

    const aborting = await connect(t, server);
    await aborting.greet();
    aborting.sendOption(2);
    t.is((await aborting.readOptionReply()).type, 1, 'ABORT is acknowledged');
    t.true(await aborting.closedWithin(10_000));
    await stillServes(t, server);
  });

  test(`an option flood is cut off (${transport})`, async (t) => {
    const server = await start(t, transport);
    const client = await connect(t, server);
    await client.greet();
    const one = Buffer.concat([Buffer.from('IHAVEOPT'), u32(42), u32(0)]);
    client.write(Buffer.concat(Array.from({ length: 5000 }, () => one)));
    t.true(await client.closedWithin(20_000));
    // An option that announces an absurd length is cut off too.
    const huge = await connect(t, server);
    await huge.greet();
    huge.write(Buffer.concat([Buffer.from('IHAVEOPT'), u32(6), u32(0xfffffff0)]));
    t.true(await huge.closedWithin(10_000));
    await stillServes(t, server);
  });

  test(`unknown commands and flags get EINVAL; a bad request magic disconnects (${transport})`, async (t) => {
    const server = await start(t, transport);
    const client = await connect(t, server);
    await client.greet();
    t.is(await client.go(''), 64 * MiB);
    client.sendRequest(99, 0, 0, 7n);
    t.deepEqual(await client.readSimpleReply(), { error: 22, cookie: 7n });
    client.sendRequest(0, 0, 512, 8n, 0x8000);
    t.deepEqual(await client.readSimpleReply(), { error: 22, cookie: 8n }, 'unknown flag on READ');
    client.sendRequest(0, 0, 512, 9n, 0x04);
    t.deepEqual(await client.readSimpleReply(), { error: 22, cookie: 9n }, 'DF without structured replies');
    client.sendRequest(7, 0, 512, 10n);
    t.deepEqual(await client.readSimpleReply(), { error: 22, cookie: 10n }, 'BLOCK_STATUS without a context');
    client.sendRequest(0, 2 ** 60, 512, 11n);
    t.deepEqual(await client.readSimpleReply(), { error: 22, cookie: 11n }, 'an offset far past the end');
    // The connection still serves reads.
    client.sendRequest(0, 0, 512, 12n);
    t.deepEqual(await client.readSimpleReply(), { error: 0, cookie: 12n });
    t.true((await client.read(512)).equals(Buffer.alloc(512)));
    // A bad magic cannot be resynchronized: disconnect.
    client.write(Buffer.alloc(28, 0xff));
    t.true(await client.closedWithin(10_000));
    await stillServes(t, server);
  });

  test(`oversize requests: refused, the write payload skipped, the connection kept (${transport})`, async (t) => {
    const server = await start(t, transport);
    const client = await connect(t, server);
    await client.greet();
    await client.go('', true);
    client.sendRequest(0, 0, 40 * MiB, 1n);
    const read = await client.readChunk();
    t.like(read, { flags: 1, type: 0x8001, cookie: 1n });
    t.is(read.payload.readUInt32BE(0), 22);
    t.regex(read.payload.toString('utf8', 6, 6 + read.payload.readUInt16BE(4)), /over the maximum/);
    // 40 MiB of payload streams past without being kept, then EINVAL.
    client.sendRequest(1, 0, 40 * MiB, 2n, 0, Buffer.alloc(40 * MiB, 0x33));
    const write = await client.readChunk();
    t.like(write, { flags: 1, type: 0x8001, cookie: 2n });
    t.is(write.payload.readUInt32BE(0), 22);
    client.sendRequest(1, 4096, 3, 3n, 0, Buffer.from('abc'));
    t.deepEqual(await client.readSimpleReply(), { error: 0, cookie: 3n });
    client.sendRequest(0, 4095, 5, 4n);
    const data = await client.readChunk();
    t.like(data, { flags: 1, type: 1, cookie: 4n });
    t.deepEqual([...data.payload.subarray(8)], [0, 0x61, 0x62, 0x63, 0]);
    // A truncated request, then the client leaves.
    client.write(Buffer.alloc(10));
    client.destroy();
    await stillServes(t, server);
  });

  test(`a client that never reads its replies stays bounded and slows no one (${transport})`, async (t) => {
    const server = await start(t, transport);
    const greedy = await connect(t, server);
    await greedy.greet();
    await greedy.go('');
    greedy.socket.pause(); // never read again
    // 4 GiB of read replies asked for, 1 MiB each.
    const requests = Buffer.alloc(28 * 4096);
    for (let i = 0; i < 4096; i++) {
      const at = i * 28;
      requests.writeUInt32BE(0x25609513, at);
      requests.writeBigUInt64BE(BigInt(i), at + 8);
      requests.writeBigUInt64BE(BigInt((i % 60) * MiB), at + 16);
      requests.writeUInt32BE(MiB, at + 24);
    }
    greedy.write(requests);
    await sleep(2000);
    await stillServes(t, server);
    const rss = Number(/VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${server.process.pid}/status`, 'utf8'))![1]) * 1024;
    t.true(rss < 512 * MiB, `server RSS ${rss} bytes`);
    t.false(greedy.closed);
    t.is(await server.stop(), 0, server.stderr());
  });

  test(`--connections caps the clients served at once (${transport})`, async (t) => {
    const server = await start(t, transport, ['--connections', '2']);
    const a = await connect(t, server);
    await a.greet();
    const b = await connect(t, server);
    await b.greet();
    const c = await connect(t, server);
    t.true(await c.closedWithin(10_000));
    a.destroy();
    await a.whenClosed;
    await sleep(200);
    b.destroy();
    await b.whenClosed;
    await sleep(200);
    await stillServes(t, server);
  });
}
