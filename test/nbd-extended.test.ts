/**
 * Extended headers (NBD_OPT_EXTENDED_HEADERS, an experimental extension of the protocol):
 * no client in Debian bookworm speaks it yet (libnbd 1.14, qemu 7.2), so these tests speak
 * it byte by byte, and check what they wrote through a real client (qemu-io) afterwards.
 */
import test, { type ExecutionContext } from 'ava';
import { listenArgs, serve, type Served } from './helpers/nbd';
import { RawClient, u32 } from './helpers/raw-nbd';
import { must } from './helpers/run';

const MiB = 1024 * 1024;
const OPT_STRUCTURED_REPLY = 8;
const OPT_SET_META_CONTEXT = 10;
const OPT_EXTENDED_HEADERS = 11;
const REP_ACK = 1;
const REP_META_CONTEXT = 4;
const ERR_INVALID = 0x80000003;
const ERR_EXT_HEADER_REQD = 0x8000000a;
const CMD = { READ: 0, WRITE: 1, FLUSH: 3, TRIM: 4, WRITE_ZEROES: 6, BLOCK_STATUS: 7 };
const FLAG_PAYLOAD_LEN = 0x20;
const FLAG_REQ_ONE = 0x08;
const REPLY = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS_EXT: 6, ERROR: 0x8001 };
const DONE = 1;

function socketOf(server: Served): { path: string } {
  return { path: decodeURIComponent(/[?&]socket=([^&]+)/.exec(server.uri)![1]) };
}

/** Greets, asks for extended headers and base:allocation, enters transmission with GO. */
async function connectExtended(t: ExecutionContext, server: Served, size = 64 * MiB): Promise<RawClient> {
  const client = await RawClient.connect(socketOf(server));
  t.teardown(() => client.destroy());
  await client.greet();
  client.sendOption(OPT_EXTENDED_HEADERS);
  t.is((await client.readOptionReply()).type, REP_ACK);
  const context = Buffer.from('base:allocation');
  client.sendOption(OPT_SET_META_CONTEXT, Buffer.concat([u32(0), u32(1), u32(context.length), context]));
  const selected = await client.readOptionReply();
  t.is(selected.type, REP_META_CONTEXT);
  t.is((await client.readOptionReply()).type, REP_ACK);
  t.is(await client.go(''), size);
  return client;
}

test('extended headers: every command answered with 32-byte chunks, 64-bit lengths', async (t) => {
  const server = await serve(t, [...listenArgs(t, 'unix'), 'memory:64M']);
  const client = await connectExtended(t, server);

  // WRITE carries its payload with PAYLOAD_LEN; success is an empty NONE chunk echoing the offset.
  client.sendExtendedRequest(CMD.WRITE, 3 * MiB + 5, 70000, 1n, FLAG_PAYLOAD_LEN, Buffer.alloc(70000, 0x6b));
  let chunk = await client.readExtendedChunk();
  t.like(chunk, { flags: DONE, type: REPLY.NONE, cookie: 1n, offset: BigInt(3 * MiB + 5) });
  t.is(chunk.payload.length, 0);

  // READ: OFFSET_DATA with the data's own offset in the payload, the request's in the header.
  client.sendExtendedRequest(CMD.READ, 3 * MiB, 100, 2n);
  chunk = await client.readExtendedChunk();
  t.like(chunk, { flags: DONE, type: REPLY.OFFSET_DATA, cookie: 2n, offset: BigInt(3 * MiB) });
  t.is(chunk.payload.readBigUInt64BE(0), BigInt(3 * MiB));
  t.deepEqual(chunk.payload.subarray(8), Buffer.concat([Buffer.alloc(5), Buffer.alloc(95, 0x6b)]));

  // BLOCK_STATUS over the whole disk: BLOCK_STATUS_EXT, (u64 length, u64 status) descriptors.
  client.sendExtendedRequest(CMD.BLOCK_STATUS, 0, 64 * MiB, 3n);
  chunk = await client.readExtendedChunk();
  t.like(chunk, { flags: DONE, type: REPLY.BLOCK_STATUS_EXT, cookie: 3n, offset: 0n });
  const count = chunk.payload.readUInt32BE(4);
  t.is(chunk.payload.length, 8 + 16 * count);
  const extents: Array<[number, number]> = [];
  for (let i = 0; i < count; i++) extents.push([Number(chunk.payload.readBigUInt64BE(8 + 16 * i)), Number(chunk.payload.readBigUInt64BE(16 + 16 * i))]);
  t.deepEqual(extents, [[3 * MiB, 3], [128 * 1024, 0], [61 * MiB - 128 * 1024, 3]]);
  client.sendExtendedRequest(CMD.BLOCK_STATUS, 3 * MiB, 5 * MiB, 4n, FLAG_REQ_ONE);
  chunk = await client.readExtendedChunk();
  t.is(chunk.payload.readUInt32BE(4), 1);
  t.is(Number(chunk.payload.readBigUInt64BE(8)), 128 * 1024);

  // A 64-bit effect length: zeroing 8 GiB is past the end of this disk (ENOSPC, as for a
  // write), while zeroing a range longer than any payload is fine.
  client.sendExtendedRequest(CMD.WRITE_ZEROES, 0, 2 ** 33, 5n);
  chunk = await client.readExtendedChunk();
  t.like(chunk, { flags: DONE, type: REPLY.ERROR, cookie: 5n });
  t.is(chunk.payload.readUInt32BE(0), 28);
  client.sendExtendedRequest(CMD.WRITE_ZEROES, 32 * MiB, 32 * MiB + 1, 55n);
  t.is((await client.readExtendedChunk()).payload.readUInt32BE(0), 28);
  client.sendExtendedRequest(CMD.WRITE_ZEROES, 10 * MiB, 40 * MiB, 56n);
  t.like(await client.readExtendedChunk(), { flags: DONE, type: REPLY.NONE, cookie: 56n, offset: BigInt(10 * MiB) });
  client.sendExtendedRequest(CMD.FLUSH, 0, 0, 6n);
  t.like(await client.readExtendedChunk(), { flags: DONE, type: REPLY.NONE, cookie: 6n });

  // Errors: a read past the end is an ERROR chunk with a message.
  client.sendExtendedRequest(CMD.READ, 64 * MiB - 10, 20, 7n);
  chunk = await client.readExtendedChunk();
  t.like(chunk, { flags: DONE, type: REPLY.ERROR, cookie: 7n, offset: BigInt(64 * MiB - 10) });
  t.is(chunk.payload.readUInt32BE(0), 22);
  t.regex(chunk.payload.toString('utf8', 6, 6 + chunk.payload.readUInt16BE(4)), /past the end/);

  // A WRITE without PAYLOAD_LEN has no payload: refused, and the stream stays in step.
  client.sendExtendedRequest(CMD.WRITE, 0, 4096, 8n);
  chunk = await client.readExtendedChunk();
  t.like(chunk, { type: REPLY.ERROR, cookie: 8n });
  // A payload on a command that takes none is read and dropped, then refused.
  client.sendExtendedRequest(CMD.TRIM, 0, 4096, 9n, FLAG_PAYLOAD_LEN, Buffer.alloc(4096, 0xee));
  chunk = await client.readExtendedChunk();
  t.like(chunk, { type: REPLY.ERROR, cookie: 9n });
  client.sendExtendedRequest(CMD.READ, 3 * MiB + 5, 4, 10n);
  chunk = await client.readExtendedChunk();
  t.like(chunk, { type: REPLY.OFFSET_DATA, cookie: 10n });
  t.deepEqual(chunk.payload.subarray(8), Buffer.alloc(4, 0x6b));

  // A payload over the maximum cannot be told from garbage: disconnected.
  client.sendExtendedRequest(CMD.WRITE, 0, 64 * MiB, 11n, FLAG_PAYLOAD_LEN);
  t.true(await client.closedWithin(10_000));

  // What was written is there for a client that knows nothing of extended headers.
  const out = await must('qemu-io', ['-f', 'raw', '-c', `read -P 0x6b ${3 * MiB + 5} 70000`, '-c', `read -P 0 ${3 * MiB} 5`, server.uri]);
  t.notRegex(out, /Pattern verification failed/);
  t.is(await server.stop(), 0);
});

test('extended headers: a READ of more than 4 GiB is refused cleanly (EINVAL, EOVERFLOW with DF), the connection goes on', async (t) => {
  const server = await serve(t, [...listenArgs(t, 'unix'), 'memory:8G']);
  const client = await connectExtended(t, server, 8 * 1024 * MiB);
  const FLAG_DF = 0x04;
  const NBD_EINVAL = 22;
  const NBD_EOVERFLOW = 75;
  // Inside the disk, but longer than the 32-bit lengths of compact requests and than the maximum block size.
  for (const [cookie, length, flags, error] of [[1n, 2 ** 32 + 4096, 0, NBD_EINVAL], [2n, 5 * 1024 * MiB, FLAG_DF, NBD_EOVERFLOW], [3n, 2 ** 32, 0, NBD_EINVAL]] as const) {
    client.sendExtendedRequest(CMD.READ, 4096, length, cookie, flags);
    const chunk = await client.readExtendedChunk();
    t.like(chunk, { flags: DONE, type: REPLY.ERROR, cookie, offset: 4096n });
    t.is(chunk.payload.readUInt32BE(0), error);
    t.regex(chunk.payload.toString('utf8', 6, 6 + chunk.payload.readUInt16BE(4)), /over the maximum/);
  }
  // Nothing was read or queued for them: the next request is answered at once, in step.
  client.sendExtendedRequest(CMD.WRITE, 6 * 1024 * MiB, 8, 4n, FLAG_PAYLOAD_LEN, Buffer.from('8 GiB ok'));
  t.like(await client.readExtendedChunk(), { flags: DONE, type: REPLY.NONE, cookie: 4n });
  client.sendExtendedRequest(CMD.READ, 6 * 1024 * MiB, 8, 5n);
  const chunk = await client.readExtendedChunk();
  t.like(chunk, { flags: DONE, type: REPLY.OFFSET_DATA, cookie: 5n });
  t.is(chunk.payload.subarray(8).toString(), '8 GiB ok');
  t.is(await server.stop(), 0);
});

test('extended headers in the handshake: no data, no way back to structured replies, no EXPORT_NAME', async (t) => {
  const server = await serve(t, [...listenArgs(t, 'unix'), 'memory:64M']);
  const client = await RawClient.connect(socketOf(server));
  t.teardown(() => client.destroy());
  await client.greet();
  client.sendOption(OPT_EXTENDED_HEADERS, Buffer.from([1]));
  t.is((await client.readOptionReply()).type, ERR_INVALID);
  client.sendOption(OPT_STRUCTURED_REPLY);
  t.is((await client.readOptionReply()).type, REP_ACK);
  client.sendOption(OPT_EXTENDED_HEADERS);
  t.is((await client.readOptionReply()).type, REP_ACK);
  client.sendOption(OPT_STRUCTURED_REPLY);
  t.is((await client.readOptionReply()).type, ERR_EXT_HEADER_REQD);
  // EXPORT_NAME cannot refuse, and is not allowed after extended headers: disconnect.
  client.sendOption(1, Buffer.alloc(0));
  t.true(await client.closedWithin(10_000));

  // A compact client on the same server is unaffected.
  const compact = await RawClient.connect(socketOf(server));
  t.teardown(() => compact.destroy());
  await compact.greet();
  t.is(await compact.go('', true), 64 * MiB);
  compact.sendRequest(CMD.READ, 0, 16, 1n);
  const reply = await compact.readChunk();
  t.like(reply, { type: REPLY.OFFSET_DATA, cookie: 1n });
  t.is(await server.stop(), 0);
});
