/**
 * providers/http/connection.ts against a scripted TCP server: the HTTP/1.1 framings a web
 * server may use (Content-Length, chunked, end of connection, 1xx first), keep-alive reuse,
 * a kept-alive socket the server closed meanwhile, and the answers it must refuse (headers
 * too large, a body longer than asked, a broken status line). Bodies land in the caller's
 * buffers; every byte is checked.
 */
import test from 'ava';
import * as crypto from 'node:crypto';
import * as net from 'node:net';
import type { AddressInfo } from 'node:net';
import * as fc from 'fast-check';
import { Scatter } from '../providers/http/scatter';
import { ChunkedDecoder, ConnectionPool, HEAD_LIMIT, ProtocolError, parseResponseHead, requestHead, type ResponseHeaders } from '../providers/http/connection';

/**
 * A server answering each request (one per `answer` call, in order, whatever connection
 * it comes on) with the bytes the script gives, written in small pieces to split them
 * across reads. `close` ends the connection after the answer.
 */
async function scripted(t: { teardown(fn: () => void): void }, script: Array<{ bytes: Buffer; close?: boolean }>) {
  const connections: net.Socket[] = [];
  const requests: string[] = [];
  let next = 0;
  const server = net.createServer((socket) => {
    connections.push(socket);
    let pending = '';
    socket.on('data', (d) => {
      pending += d.toString('latin1');
      let end: number;
      while ((end = pending.indexOf('\r\n\r\n')) >= 0) {
        requests.push(pending.slice(0, end));
        pending = pending.slice(end + 4);
        const step = script[next++];
        if (!step) return void socket.destroy();
        // Pieces of 1000 bytes: heads and bodies split at awkward places.
        for (let at = 0; at < step.bytes.length; at += 1000) socket.write(step.bytes.subarray(at, at + 1000));
        if (step.close) socket.end();
      }
    });
    socket.on('error', () => {});
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.teardown(() => {
    for (const c of connections) c.destroy();
    server.close();
  });
  return { origin: new URL(`http://127.0.0.1:${(server.address() as AddressInfo).port}`), connections, requests };
}

/** Runs one GET through the pool into `targets`; resolves with the status, headers and bytes written. */
function get(pool: ConnectionPool, targets: Buffer[], headers: Record<string, string> = {}): Promise<{ status: number; headers: ResponseHeaders; written: number }> {
  return new Promise((resolve, reject) => {
    const sink = new Scatter(targets);
    let head: { status: number; headers: ResponseHeaders } | undefined;
    const cancel = pool.dispatch({
      method: 'GET',
      path: '/x',
      headers,
      onHead: (status, h) => {
        head = { status, headers: h };
        return status === 206 || status === 200 ? sink : 'drop';
      },
      onEnd: () => {
        clearTimeout(timer);
        resolve({ ...head!, written: sink.length - sink.remaining });
      },
      onError: (e) => {
        clearTimeout(timer);
        reject(e);
      },
    });
    const timer = setTimeout(() => cancel(new Error('test timeout')), 30_000);
  });
}

const http = (status: string, headers: string[], body: Buffer = Buffer.alloc(0)) => Buffer.concat([Buffer.from(`HTTP/1.1 ${status}\r\n${headers.map((h) => `${h}\r\n`).join('')}\r\n`, 'latin1'), body]);

function chunked(body: Buffer, sizes: number[]): Buffer {
  const parts: Buffer[] = [];
  for (let at = 0, i = 0; at < body.length; i++) {
    const n = Math.min(sizes[i % sizes.length], body.length - at);
    parts.push(Buffer.from(`${n.toString(16)}${i % 2 ? ';ext=1' : ''}\r\n`), body.subarray(at, at + n), Buffer.from('\r\n'));
    at += n;
  }
  parts.push(Buffer.from('0\r\nX-Trailer: yes\r\n\r\n'));
  return Buffer.concat(parts);
}

test('Content-Length bodies fill several buffers in order, on one kept-alive connection', async (t) => {
  const a = crypto.randomBytes(300_000);
  const b = crypto.randomBytes(5000);
  const server = await scripted(t, [
    { bytes: http('206 Partial Content', [`Content-Length: ${a.length}`, 'Content-Range: bytes 0-299999/300000']) },
    { bytes: http('206 Partial Content', [`Content-Length: ${b.length}`], b) },
  ]);
  // The first body comes after the head in a separate write; both must land right.
  server.requests.length = 0;
  const pool = new ConnectionPool(server.origin, { connections: 2 });
  t.teardown(() => pool.destroy());
  const targets = [Buffer.alloc(100_000), Buffer.alloc(150_000), Buffer.alloc(50_000)];
  const first = get(pool, targets, { range: 'bytes=0-299999' });
  // Once the server has the request (its head is on the way), the body follows in a write of its own.
  while (server.requests.length === 0) await new Promise((r) => setTimeout(r, 10));
  server.connections[0].write(a);
  const r1 = await first;
  t.is(r1.status, 206);
  t.is(r1.headers['content-range'], 'bytes 0-299999/300000');
  t.true(Buffer.concat(targets).equals(a));
  const out = Buffer.alloc(b.length);
  await get(pool, [out]);
  t.true(out.equals(b));
  t.is(server.connections.length, 1, 'the second request reused the connection');
  t.regex(server.requests[0], /^GET \/x HTTP\/1\.1\r\nhost: 127\.0\.0\.1:\d+\r\nrange: bytes=0-299999$/);
});

test('chunked bodies (with extensions and a trailer) are decoded into the buffers, and the connection is reused', async (t) => {
  const body = crypto.randomBytes(70_000);
  const server = await scripted(t, [
    { bytes: http('206 Partial Content', ['Transfer-Encoding: chunked'], chunked(body, [1, 4096, 33_333, 7])) },
    { bytes: http('206 Partial Content', ['Content-Length: 3'], Buffer.from('end')) },
  ]);
  const pool = new ConnectionPool(server.origin, { connections: 1 });
  t.teardown(() => pool.destroy());
  const out = [Buffer.alloc(20_000), Buffer.alloc(50_000)];
  const r = await get(pool, out);
  t.is(r.written, body.length);
  t.true(Buffer.concat(out).equals(body));
  const end = Buffer.alloc(3);
  await get(pool, [end]);
  t.is(end.toString(), 'end');
  t.is(server.connections.length, 1);
});

test('1xx answers are skipped; a body framed by the end of the connection is read to its end', async (t) => {
  const body = crypto.randomBytes(12_345);
  const server = await scripted(t, [{ bytes: Buffer.concat([http('100 Continue', []), http('103 Early Hints', ['Link: </a>']), http('200 OK', [], body)]), close: true }]);
  const pool = new ConnectionPool(server.origin, { connections: 1 });
  t.teardown(() => pool.destroy());
  const out = Buffer.alloc(body.length);
  const r = await get(pool, [out]);
  t.is(r.status, 200);
  t.is(r.written, body.length);
  t.true(out.equals(body));
});

test('a kept-alive connection the server closed meanwhile is replaced without failing the request', async (t) => {
  const server = await scripted(t, [
    { bytes: http('206 Partial Content', ['Content-Length: 2'], Buffer.from('ab')) },
    { bytes: http('206 Partial Content', ['Content-Length: 2'], Buffer.from('cd')) },
  ]);
  const pool = new ConnectionPool(server.origin, { connections: 1 });
  t.teardown(() => pool.destroy());
  const one = Buffer.alloc(2);
  await get(pool, [one]);
  // The server drops the idle connection; the client may not have noticed yet.
  server.connections[0].destroy();
  const two = Buffer.alloc(2);
  await get(pool, [two]);
  t.is(`${one}${two}`, 'abcd');
  t.is(server.connections.length, 2);
});

test('bytes after an answer without a body are not taken for the next answer: that connection is not reused', async (t) => {
  const server = await scripted(t, [
    { bytes: Buffer.concat([http('204 No Content', []), Buffer.from('HTTP/1.1 206 Partial Content\r\nContent-Length: 2\r\n\r\nXX')]) },
    { bytes: http('206 Partial Content', ['Content-Length: 2'], Buffer.from('ok')) },
  ]);
  const pool = new ConnectionPool(server.origin, { connections: 1 });
  t.teardown(() => pool.destroy());
  const first = await get(pool, [Buffer.alloc(2)]);
  t.is(first.status, 204);
  const out = Buffer.alloc(2);
  const second = await get(pool, [out]);
  t.is(second.status, 206);
  t.is(out.toString(), 'ok', 'the smuggled answer was not read as the second one');
  t.is(server.connections.length, 2);
});

test('answers that break HTTP are refused with a ProtocolError, never hang and never overrun the buffers', async (t) => {
  const cases: Array<[string, Buffer, RegExp]> = [
    ['headers over the limit', http('200 OK', [`X-Big: ${'a'.repeat(HEAD_LIMIT)}`]), /headers longer than 64 KiB/],
    ['a body longer than asked', http('206 Partial Content', ['Content-Length: 20'], Buffer.alloc(20)), /body of 20 bytes; the range asked for 10/],
    ['a broken status line', Buffer.from('HTTP/2 200 OK\r\n\r\n'), /not an HTTP\/1\.x status line/],
    ['a malformed header line', http('200 OK', ['no colon here']), /malformed header line/],
    ['a bad Content-Length', http('200 OK', ['Content-Length: 12abc']), /bad Content-Length/],
    ['conflicting Content-Lengths', http('200 OK', ['Content-Length: 1', 'Content-Length: 2']), /conflicting Content-Length/],
    ['a chunked body longer than asked', http('200 OK', ['Transfer-Encoding: chunked'], chunked(Buffer.alloc(11), [11])), /more bytes than the range asked for/],
    ['a bad chunk size', http('200 OK', ['Transfer-Encoding: chunked'], Buffer.from('zz\r\n')), /bad chunk size line/],
  ];
  for (const [what, bytes, message] of cases) {
    const server = await scripted(t, [{ bytes }]);
    const pool = new ConnectionPool(server.origin, { connections: 1 });
    const guard = Buffer.alloc(12, 0x55);
    const target = guard.subarray(0, 10);
    const error = await t.throwsAsync(get(pool, [target]), { instanceOf: ProtocolError }, what);
    t.regex(error?.message ?? '', message, what);
    t.is(guard.subarray(10).toString('hex'), '5555', `${what}: nothing written past the buffer`);
    pool.destroy();
  }
});

test('request heads refuse header values and paths that would split the request', (t) => {
  const origin = new URL('http://h:8080');
  t.is(requestHead({ method: 'HEAD', path: '/a?b=c', headers: { 'x-a': '1' } }, origin), 'HEAD /a?b=c HTTP/1.1\r\nhost: h:8080\r\nx-a: 1\r\n\r\n');
  t.throws(() => requestHead({ method: 'GET', path: '/a', headers: { 'x-a': 'v\r\nx-evil: 1' } }, origin), { instanceOf: ProtocolError });
  t.throws(() => requestHead({ method: 'GET', path: '/a b', headers: {} }, origin), { instanceOf: ProtocolError });
  t.throws(() => requestHead({ method: 'GET', path: '/a', headers: { 'bad name': 'v' } }, origin), { instanceOf: ProtocolError });
});

test('head parsing and chunked decoding hold on any input and any split', (t) => {
  fc.assert(
    fc.property(fc.string({ maxLength: 200 }), (text) => {
      try {
        const head = parseResponseHead(text);
        return head.status >= 0 && head.status <= 999;
      } catch (e) {
        return e instanceof ProtocolError;
      }
    }),
  );
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 3000 }), fc.array(fc.integer({ min: 1, max: 700 }), { minLength: 1, maxLength: 5 }), fc.array(fc.integer({ min: 1, max: 300 }), { minLength: 1, maxLength: 8 }), (body, sizes, splits) => {
      const encoded = chunked(Buffer.from(body), sizes);
      const decoder = new ChunkedDecoder();
      const got: Buffer[] = [];
      let done = false;
      for (let at = 0, i = 0; at < encoded.length; i++) {
        const n = splits[i % splits.length];
        done = decoder.feed(encoded.subarray(at, at + n), (piece) => got.push(Buffer.from(piece)));
        at += n;
      }
      return done && Buffer.concat(got).equals(Buffer.from(body));
    }),
  );
  t.pass();
});
