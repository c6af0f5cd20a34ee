/**
 * The http source against a server that misbehaves on demand (test/helpers/fault-server):
 * each fault gets the behaviour providers/http/README.md promises, and the provider reads
 * correctly again once the fault stops.
 */
import 'reflect-metadata';
import '../providers';
import test from 'ava';
import { execFile } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { isSourceChanged } from '../core/changed';
import type { BlockError } from '../core/errors';
import { openSpec } from '../core/open';
import { OpenRequest } from '../core/open-request';
import type { Capabilities, DiskInfo, Provider } from '../core/provider';
import { provider } from '../core/registry';
import { Vbd } from '../core/vbd';
import { FaultServer } from './helpers/fault-server';
import { must } from './helpers/run';
import * as fc from 'fast-check';
import { parseContentRange } from '../providers/http/client';
import { parseHeaderOption } from '../providers/http/url';

const SECRET = 's3cretPW';

async function serve(t: { teardown(fn: () => Promise<void> | void): void }, data: Buffer, tls?: { key: string; cert: string }): Promise<FaultServer> {
  const server = await new FaultServer().start(tls);
  server.put('/disk.img', data);
  t.teardown(() => server.stop());
  return server;
}

async function open(t: { teardown(fn: () => Promise<void> | void): void }, spec: string): Promise<Provider> {
  const p = await openSpec(spec, { readOnly: true, warn: () => {} });
  t.teardown(() => p.close());
  return p;
}

async function readAt(p: Provider, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  await p.read(buf, offset);
  return buf;
}

const data = crypto.randomBytes(1 << 20);

/**
 * A minimal test format standing in for qcow2/VHD: its container is the text
 * `LINK <name>`, and its disk is the backing file it names (opened through openBacking,
 * so resolved against the image's URL exactly as a real format's backing file is).
 */
@provider({ name: 'test-http-link', kind: 'format', description: 'test only: a link to a backing file' })
class LinkFormat implements Provider {
  readonly name = 'test-http-link';
  backing!: Provider;
  constructor(private readonly request: OpenRequest) {}
  get lower(): Provider {
    return this.request.lower!;
  }
  async open(): Promise<void> {
    const text = Buffer.alloc(this.lower.info().size);
    await this.lower.read(text, 0);
    this.backing = await this.request.openBacking(text.toString().replace(/^LINK /, '').trim());
  }
  info(): DiskInfo {
    return { ...this.backing.info(), readOnly: true };
  }
  capabilities(): Capabilities {
    return this.backing.capabilities();
  }
  read(buf: Uint8Array, offset: number): Promise<void> {
    return this.backing.read(buf, offset);
  }
  async close(): Promise<void> {
    await this.backing?.close();
    await this.lower.close();
  }
}
void LinkFormat;

test('dropped connections are retried and the read succeeds', async (t) => {
  const server = await serve(t, data);
  server.faults.drop = 2;
  const p = await open(t, `http:${server.base}/disk.img`);
  t.is(p.info().size, data.length);
  server.faults.drop = 2;
  t.deepEqual(await readAt(p, 4096, 8192), data.subarray(4096, 12288));
});

test('503 with Retry-After is honoured, then the read succeeds', async (t) => {
  const server = await serve(t, data);
  const p = await open(t, `http,readahead=0:${server.base}/disk.img`);
  server.faults.unavailable = 1;
  server.faults.retryAfterSeconds = 1;
  const started = Date.now();
  t.deepEqual(await readAt(p, 0, 4096), data.subarray(0, 4096));
  // Not a speed assertion: the server asked the client to wait a second before trying again.
  t.true(Date.now() - started >= 900, 'the retry waited for Retry-After');
  t.is(server.log.filter((r) => r.method === 'GET').length, 2);
});

test('429 is retried like 503', async (t) => {
  const server = await serve(t, data);
  const p = await open(t, `http,readahead=0:${server.base}/disk.img`);
  server.faults.unavailable = 2;
  server.faults.unavailableStatus = 429;
  server.faults.retryAfterSeconds = 0;
  t.deepEqual(await readAt(p, 65536, 100), data.subarray(65536, 65636));
});

test('after the last try the error is clear, and reads recover when the server does', async (t) => {
  const server = await serve(t, data);
  const p = await open(t, `http,retries=2,readahead=0:${server.base}/disk.img`);
  server.faults.unavailable = 1000;
  server.faults.retryAfterSeconds = 0;
  const e = await t.throwsAsync<BlockError>(readAt(p, 0, 512));
  t.is(e!.code, 'EIO');
  t.regex(e!.message, /HTTP 503; gave up after 3 tries/);
  t.true(e!.message.includes(`${server.base}/disk.img`), e!.message);
  server.faults.unavailable = 0;
  t.deepEqual(await readAt(p, 0, 512), data.subarray(0, 512));
});

test('a response slower than the timeout is abandoned and retried; without tries left it is ETIMEDOUT', async (t) => {
  const server = await serve(t, data);
  // Margins a loaded machine cannot eat: a 2 s timeout, 4 tries, stalls of 8 s.
  const p = await open(t, `http,timeout=2,retries=3,readahead=0:${server.base}/disk.img`);
  // Only the first answer stalls (far past the timeout): a retry gets the bytes.
  server.faults.stall = 1;
  server.faults.stallMs = 8000;
  t.deepEqual(await readAt(p, 512, 512), data.subarray(512, 1024));
  // Every answer stalls: after four tries, a timeout error.
  server.faults.stall = 1000;
  const e = await t.throwsAsync<BlockError>(readAt(p, 0, 512));
  t.is(e!.code, 'ETIMEDOUT');
  t.regex(e!.message, /within 2 s; gave up after 4 tries/);
  server.faults.stall = 0;
  t.deepEqual(await readAt(p, 0, 512), data.subarray(0, 512));
});

test('an object replaced while open is EIO naming the URL, for every later read', async (t) => {
  const server = await serve(t, data);
  const p = await open(t, `http,readahead=0:${server.base}/disk.img`);
  t.deepEqual(await readAt(p, 0, 4096), data.subarray(0, 4096));
  t.true(server.log.some((r) => r.ifMatch !== undefined), 'range requests carry If-Match');
  server.put('/disk.img', crypto.randomBytes(data.length));
  const e = await t.throwsAsync<BlockError>(readAt(p, 8192, 4096));
  t.is(e!.code, 'EIO');
  t.true(isSourceChanged(e));
  t.true(e!.message.includes(`${server.base}/disk.img`), e!.message);
  t.regex(e!.message, /changed since it was opened/);
  // Even the range read before the change is refused now: never a mix of versions.
  const again = await t.throwsAsync<BlockError>(readAt(p, 0, 4096));
  t.regex(again!.message, /changed/);
});

test('through lent readahead views (the NBD path), an object replaced while open is EIO too, for every later read', async (t) => {
  const big = crypto.randomBytes(8 << 20);
  const server = await serve(t, big);
  server.put('/big.img', big);
  // A 1 MiB window in 256 KiB requests.
  const vbd = new Vbd(await open(t, `http,readahead=1M:${server.base}/big.img`));
  const views = async (offset: number, length: number) => Buffer.concat(await vbd.readViews(offset, length));
  let offset = 0;
  for (; offset < 2 << 20; offset += 64 << 10) t.deepEqual(await views(offset, 64 << 10), big.subarray(offset, offset + (64 << 10)));
  const ranges = server.log.filter((r) => r.method === 'GET' && r.path === '/big.img').length;
  t.true(ranges < 16, `${ranges} GETs for 32 sequential 64 KiB reads (readahead)`);
  server.put('/big.img', crypto.randomBytes(big.length));
  // Reading on reaches chunks fetched after the change: refused, never the new bytes.
  const e = await t.throwsAsync<BlockError>(async () => {
    for (; offset < big.length; offset += 64 << 10) {
      const got = await views(offset, 64 << 10);
      if (!got.equals(big.subarray(offset, offset + (64 << 10)))) throw new Error(`new bytes at ${offset}`);
    }
  });
  t.is(e!.code, 'EIO');
  t.true(isSourceChanged(e), e!.message);
  // Every later read fails, even of ranges read (or read ahead) before the change.
  await t.throwsAsync(views(0, 64 << 10), { message: /changed/ });
  await t.throwsAsync(views(offset - (64 << 10), 64 << 10), { message: /changed/ });
});

test('the cache filter serves no stale block once the source reported a change', async (t) => {
  const server = await serve(t, data);
  const p = await open(t, `cache,size=1M,block=64K:http,readahead=0:${server.base}/disk.img`);
  t.deepEqual(await readAt(p, 0, 4096), data.subarray(0, 4096));
  const before = server.log.length;
  t.deepEqual(await readAt(p, 0, 4096), data.subarray(0, 4096));
  t.is(server.log.length, before, 'the second read was a cache hit');
  server.put('/disk.img', crypto.randomBytes(data.length));
  await t.throwsAsync(readAt(p, 5 * 65536, 4096), { message: /changed/ });
  // Block 0 was cached from the old version: it must not come back.
  await t.throwsAsync(readAt(p, 0, 4096), { message: /changed/ });
  t.is((p.describe!() as { cachedBlocks: number }).cachedBlocks, 0);
});

test('a server that ignores Range is refused at open without downloading the object', async (t) => {
  const big = Buffer.alloc(32 << 20, 7);
  const server = await serve(t, big);
  server.faults.ignoreRange = true;
  const e = await t.throwsAsync<BlockError>(openSpec(`http:${server.base}/disk.img`, { readOnly: true }));
  t.is(e!.code, 'EOPNOTSUPP');
  t.regex(e!.message, /ignores range requests/);
  await new Promise((r) => setTimeout(r, 200));
  t.true(server.wholeBodyBytesSent < big.length / 2, `sent ${server.wholeBodyBytesSent} of ${big.length} bytes`);
});

test('a server that stops honouring Range after open is an EIO, and reads recover when it honours it again', async (t) => {
  const server = await serve(t, Buffer.concat([data, data, data, data]));
  const p = await open(t, `http,readahead=0:${server.base}/disk.img`);
  server.faults.ignoreRange = true;
  const e = await t.throwsAsync<BlockError>(readAt(p, 0, 4096));
  t.regex(e!.message, /ignored the Range header/);
  server.faults.ignoreRange = false;
  t.deepEqual(await readAt(p, 0, 4096), data.subarray(0, 4096));
});

test('a redirect chain is followed once; later ranges go to the final URL', async (t) => {
  const server = await serve(t, data);
  server.redirects.set('/first', '/second');
  server.redirects.set('/second', `${server.base}/disk.img`);
  const p = await open(t, `http:${server.base}/first`);
  t.is(p.info().size, data.length);
  const opened = server.log.length;
  t.deepEqual(await readAt(p, 1000, 70000), data.subarray(1000, 71000));
  const later = server.log.slice(opened);
  t.true(later.length > 0);
  t.true(later.every((r) => r.path === '/disk.img'), JSON.stringify(later.map((r) => r.path)));
  t.is(p.location, `${server.base}/first`);
  t.is((p.describe!() as { redirectedTo: string }).redirectedTo, `${server.base}/disk.img`);
});

test('a server that refuses HEAD is sized from a ranged GET', async (t) => {
  const server = await serve(t, data);
  server.faults.refuseHead = true;
  const p = await open(t, `http:${server.base}/disk.img`);
  t.is(p.info().size, data.length);
  t.deepEqual(await readAt(p, data.length - 100, 100), data.subarray(data.length - 100));
});

test('a missing object is ENOENT', async (t) => {
  const server = await serve(t, data);
  const e = await t.throwsAsync<BlockError>(openSpec(`http:${server.base}/nothing`, { readOnly: true }));
  t.is(e!.code, 'ENOENT');
});

test('adjacent reads waiting for a connection are merged, sequential reads are read ahead', async (t) => {
  const server = await serve(t, data);
  const p = await open(t, `http,connections=1,readahead=0:${server.base}/disk.img`);
  const gets = () => server.log.filter((r) => r.method === 'GET').length;
  const reads = Array.from({ length: 32 }, (_, i) => readAt(p, i * 4096, 4096));
  const got = await Promise.all(reads);
  t.deepEqual(Buffer.concat(got), data.subarray(0, 32 * 4096));
  t.true(gets() < 8, `${gets()} GETs for 32 adjacent reads`);

  const q = await open(t, `http,readahead=256K:${server.base}/disk.img`);
  const start = gets();
  for (let off = 0; off < 512 * 1024; off += 4096) t.deepEqual(await readAt(q, off, 4096), data.subarray(off, off + 4096));
  t.true(gets() - start < 16, `${gets() - start} GETs for 128 sequential 4 KiB reads`);
});

test('credentials in the URL are used but never printed', async (t) => {
  const server = await serve(t, data);
  server.faults.basicAuth = `user:${SECRET}`;
  const withCreds = server.base.replace('://', `://user:${SECRET}@`);
  const denied = await t.throwsAsync<BlockError>(openSpec(`http:${server.base}/disk.img`, { readOnly: true }));
  t.is(denied!.code, 'EACCES');

  const p = await open(t, `http,retries=1,readahead=0:${withCreds}/disk.img`);
  t.deepEqual(await readAt(p, 0, 1024), data.subarray(0, 1024));
  const messages: string[] = [p.location ?? '', JSON.stringify(p.describe!())];
  server.faults.unavailable = 10;
  messages.push((await t.throwsAsync(readAt(p, 4096, 10)))!.message);
  server.faults.unavailable = 0;
  server.faults.stall = 2;
  server.faults.stallMs = 100;
  server.put('/disk.img', crypto.randomBytes(1000));
  messages.push((await t.throwsAsync(readAt(p, 8192, 10)))!.message);
  messages.push((await t.throwsAsync(openSpec(`http:${withCreds}/missing`, { readOnly: true })))!.message);
  messages.push((await t.throwsAsync(openSpec(`http,timeout=x:${withCreds}/disk.img`, { readOnly: true })))!.message);
  messages.push((await t.throwsAsync(openSpec(`http,colour=red:${withCreds}/disk.img`, { readOnly: true })))!.message);
  // Through the CLI too: one line on stderr.
  // (asynchronously: the server answering it runs in this process)
  const cli = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
    execFile(process.execPath, [path.join(__dirname, '../core/cli/main.js'), 'info', `${withCreds}/missing`], { encoding: 'utf8', timeout: 30_000 }, (error, _stdout, stderr) => {
      resolve({ code: error ? (typeof error.code === 'number' ? error.code : null) : 0, stderr });
    });
  });
  t.is(cli.code, 1, cli.stderr);
  t.regex(cli.stderr, /not found/);
  messages.push(cli.stderr);
  const info = await new Promise<{ stdout: string; stderr: string }>((resolve) => {
    execFile(process.execPath, [path.join(__dirname, '../core/cli/main.js'), 'info', `${withCreds}/disk.img`], { encoding: 'utf8', timeout: 30_000 }, (_e, stdout, stderr) => resolve({ stdout, stderr }));
  });
  t.regex(info.stdout, /spec: +http:\/\/127\.0\.0\.1/);
  messages.push(info.stdout, info.stderr);
  for (const m of messages) {
    t.false(m.includes(SECRET), m);
    t.false(m.includes('user:'), m);
  }
  t.true(server.log.some((r) => r.authorization === `Basic ${Buffer.from(`user:${SECRET}`).toString('base64')}`));
});

test('the header option sends extra headers (percent-decoded)', async (t) => {
  const server = await serve(t, data);
  server.faults.basicAuth = `user:${SECRET}`;
  const value = `Basic ${Buffer.from(`user:${SECRET}`).toString('base64')}`;
  const p = await open(t, `http,header=Authorization%3A ${encodeURIComponent(value)}%0AX-Trace%3A 1:${server.base}/disk.img`);
  t.deepEqual(await readAt(p, 0, 100), data.subarray(0, 100));
  t.true(server.log.length > 0 && server.log.every((r) => r.headers['x-trace'] === '1' && r.authorization === value));
  await t.throwsAsync(openSpec(`http,header=NoColonHere:${server.base}/disk.img`, { readOnly: true }), { message: /Name: value/ });
});

test('writes are refused with EROFS', async (t) => {
  const server = await serve(t, data);
  const p = await open(t, `http:${server.base}/disk.img`);
  t.false(p.capabilities().write);
  t.true(p.info().readOnly);
  const e = await t.throwsAsync<BlockError>(new Vbd(p).write(Buffer.alloc(512), 0, {}));
  t.is(e!.code, 'EROFS');
  t.deepEqual(await p.extents!(0, data.length), [{ offset: 0, length: data.length, type: 'data' }]);
});

test('a certificate the client does not trust is refused; ca= makes it trusted', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-tls-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const key = path.join(dir, 'key.pem');
  const cert = path.join(dir, 'cert.pem');
  await must('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1']);
  const server = await serve(t, data, { key: fs.readFileSync(key, 'utf8'), cert: fs.readFileSync(cert, 'utf8') });
  const e = await t.throwsAsync<BlockError>(openSpec(`${server.base}/disk.img`, { readOnly: true }));
  t.regex(e!.message, /TLS certificate refused .*--ca FILE/);
  t.is(server.log.length, 0, 'no request went over the untrusted connection');
  const p = await open(t, `http,ca=${cert}:${server.base}/disk.img`);
  t.deepEqual(await readAt(p, 100, 1000), data.subarray(100, 1100));
  await t.throwsAsync(openSpec(`http,ca=${dir}/none.pem:${server.base}/disk.img`, { readOnly: true }), { message: /cannot read the CA file/ });
});

test('a backing file named relative to an http image is read from the same server, with its credentials and headers', async (t) => {
  const server = await serve(t, data);
  server.put('/images/top.link', Buffer.from('LINK base.img\n'));
  server.put('/images/base.img', data);
  server.faults.basicAuth = `user:${SECRET}`;
  const withCreds = server.base.replace('://', `://user:${SECRET}@`);
  const p = await open(t, `test-http-link:http,readahead=0,header=X-Tenant%3A 7:${withCreds}/images/top.link`);
  t.is(p.info().size, data.length);
  t.deepEqual(await readAt(p, 12345, 5000), data.subarray(12345, 17345));
  const baseReads = server.log.filter((r) => r.path === '/images/base.img' && r.method === 'GET');
  t.true(baseReads.length > 0 && baseReads.every((r) => r.authorization !== undefined && r.headers['x-tenant'] === '7'));
  t.false(JSON.stringify(p.backing!.describe!()).includes(SECRET));
  t.is(p.backing!.location, `${server.base}/images/base.img`);
});

test('another disk on the same server never borrows the credentials or headers of a disk already open', async (t) => {
  const server = await serve(t, data);
  server.put('/other.img', data);
  server.faults.basicAuth = `user:${SECRET}`;
  const withCreds = server.base.replace('://', `://user:${SECRET}@`);
  const first = await open(t, `http,header=X-Tenant%3A 7:${withCreds}/disk.img`);
  t.deepEqual(await readAt(first, 0, 10), data.subarray(0, 10));
  const e = await t.throwsAsync<BlockError>(openSpec(`${server.base}/other.img`, { readOnly: true }));
  t.is(e!.code, 'EACCES');
  const others = server.log.filter((r) => r.path === '/other.img');
  t.true(others.length > 0 && others.every((r) => r.authorization === undefined && r.headers['x-tenant'] === undefined));
});

function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [path.join(__dirname, '../core/cli/main.js'), ...args], { encoding: 'utf8', timeout: 60_000 }, (error, stdout, stderr) => {
      resolve({ code: error ? (typeof error.code === 'number' ? error.code : -1) : 0, stdout, stderr });
    });
  });
}

test('--ca and --header on the command line reach the http source; a spec option wins over them', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-tls-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const key = path.join(dir, 'key.pem');
  const cert = path.join(dir, 'cert.pem');
  await must('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1']);
  const server = await serve(t, data, { key: fs.readFileSync(key, 'utf8'), cert: fs.readFileSync(cert, 'utf8') });
  const token = `Bearer ${SECRET}, with: a colon`;
  server.faults.basicAuth = undefined;

  const refused = await cli(['info', `${server.base}/disk.img`]);
  t.is(refused.code, 1);
  t.regex(refused.stderr, /TLS certificate refused .*--ca FILE/);

  const out = path.join(dir, 'out.raw');
  const converted = await cli(['convert', '--ca', cert, '--header', `Authorization: ${token}`, '--header', 'X-Trace: 2', `${server.base}/disk.img`, out]);
  t.is(converted.code, 0, converted.stderr);
  t.true(fs.readFileSync(out).equals(data));
  const gets = server.log.filter((r) => r.method === 'GET');
  t.true(gets.length > 0 && gets.every((r) => r.authorization === token && r.headers['x-trace'] === '2'));
  t.false(converted.stderr.includes(SECRET));

  // A spec's own header option wins over --header.
  server.log.length = 0;
  const own = await cli(['info', '--ca', cert, '--header', 'X-Trace: 2', `http,header=X-Trace%3A 3:${server.base}/disk.img`]);
  t.is(own.code, 0, own.stderr);
  t.true(server.log.every((r) => r.headers['x-trace'] === '3'));

  const bad = await cli(['info', '--header', 'no colon', `${server.base}/disk.img`]);
  t.is(bad.code, 2);
  t.regex(bad.stderr, /--header needs 'Name: value'/);
});

test('a server that answers another range than asked is an EIO, never wrong bytes', async (t) => {
  const server = await serve(t, data);
  const p = await open(t, `http,readahead=0:${server.base}/disk.img`);
  server.faults.lieAboutRange = true;
  const e = await t.throwsAsync<BlockError>(readAt(p, 4096, 4096));
  t.is(e!.code, 'EIO');
  t.regex(e!.message, /answered range bytes 4097-8192\/\d+ to a request for bytes 4096-8191/);
  server.faults.lieAboutRange = false;
  t.deepEqual(await readAt(p, 4096, 4096), data.subarray(4096, 8192));
});

test('Content-Range and header parsing never throw on hostile text', (t) => {
  // Random text, and text shaped like a Content-Range with numbers of any length.
  const contentRanges = fc.oneof(fc.string({ maxLength: 80 }), fc.stringMatching(/^ ?bytes (\d{1,400}-\d{1,400}|\*)\/(\d{1,400}|\*) ?$/));
  fc.assert(
    fc.property(contentRanges, (text) => {
      const r = parseContentRange(text);
      return r === undefined || [r.start, r.end, r.total].every((v) => v === undefined || (Number.isSafeInteger(v) && v >= 0));
    }),
  );
  // Refusals are fixed sentences: they never echo the value (it may be a secret).
  const refusals = ['malformed percent-encoding in header option', "header option needs 'Name: value' (write ':' as %3A)"];
  fc.assert(
    fc.property(fc.oneof(fc.string({ maxLength: 80 }), fc.stringMatching(/^[A-Za-z-]{1,8}%3A[ -~]{0,20}(%0A[A-Za-z-]{1,8}%3A[ -~]{0,20})?$/)), (text) => {
      try {
        const headers = parseHeaderOption(text);
        return Object.keys(headers).every((name) => /^[!#$%&'*+.^_`|~0-9a-z-]+$/.test(name));
      } catch (e) {
        return refusals.includes((e as Error).message);
      }
    }),
  );
  t.deepEqual(parseContentRange('bytes 0-9/100'), { start: 0, end: 9, total: 100 });
  t.deepEqual(parseContentRange('bytes */0'), { start: undefined, end: undefined, total: 0 });
  t.is(parseContentRange('bytes 0-9'), undefined);
  t.is(parseContentRange(`bytes 0-9/${'9'.repeat(30)}`), undefined);
  t.deepEqual(parseHeaderOption('X-A%3A 1%0AX-B%3A two'), { 'x-a': '1', 'x-b': 'two' });
});

test('a body cut off mid-way is retried and the read succeeds', async (t) => {
  const server = await serve(t, data);
  const p = await open(t, `http,readahead=0:${server.base}/disk.img`);
  server.faults.truncate = 2;
  t.deepEqual(await readAt(p, 65536, 200_000), data.subarray(65536, 265_536));
  t.is(server.faults.truncate, 0);
  t.true(server.log.filter((r) => r.range === 'bytes=65536-265535').length >= 3);
});

test('requests in flight never exceed connections=N, and several run at once', async (t) => {
  const server = await serve(t, data);
  const p = await open(t, `http,connections=3,readahead=0:${server.base}/disk.img`);
  server.maxInFlight = 0;
  // Every answer waits a little, so requests overlap; the reads are far apart (nothing to merge).
  server.faults.stall = 24;
  server.faults.stallMs = 150;
  const offsets = Array.from({ length: 24 }, (_, i) => i * 40_000);
  const got = await Promise.all(offsets.map((off) => readAt(p, off, 1000)));
  t.deepEqual(got, offsets.map((off) => data.subarray(off, off + 1000)));
  t.true(server.maxInFlight <= 3, `${server.maxInFlight} requests at once`);
  t.true(server.maxInFlight >= 2, `${server.maxInFlight} requests at once`);
});

for (const validator of ['last-modified', 'weak-etag'] as const) {
  test(`an object replaced while open is detected with ${validator === 'weak-etag' ? 'a weak ETag (and no Last-Modified)' : 'Last-Modified alone'}`, async (t) => {
    const server = await serve(t, data);
    server.faults.validator = validator;
    const p = await open(t, `http,readahead=0:${server.base}/disk.img`);
    t.deepEqual(await readAt(p, 0, 4096), data.subarray(0, 4096));
    if (validator === 'last-modified') t.true(server.log.some((r) => r.headers['if-unmodified-since'] !== undefined && r.ifMatch === undefined));
    // A weak ETag may not go in If-Match: the answer's ETag is compared instead.
    else t.true(server.log.every((r) => r.ifMatch === undefined));
    server.put('/disk.img', crypto.randomBytes(data.length));
    const e = await t.throwsAsync<BlockError>(readAt(p, 8192, 4096));
    t.true(isSourceChanged(e));
    t.regex(e!.message, /changed since it was opened/);
  });
}

test('an object with neither ETag nor Last-Modified opens with a warning that changes cannot be detected', async (t) => {
  const server = await serve(t, data);
  server.faults.validator = 'none';
  const warnings: string[] = [];
  const p = await openSpec(`${server.base}/disk.img`, { readOnly: true, warn: (m) => warnings.push(m) });
  t.teardown(() => p.close());
  t.true(warnings.some((w) => /neither ETag nor Last-Modified/.test(w)), JSON.stringify(warnings));
  t.deepEqual(await readAt(p, 0, 100), data.subarray(0, 100));
  // And a file-backed cache over it is not kept (nothing would tell a stale file apart).
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-cache-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const cached = await openSpec(`cache,file=${dir}/c:${server.base}/disk.img`, { readOnly: true, warn: (m) => warnings.push(m) });
  t.teardown(() => cached.close());
  t.like(cached.describe!(), { persistent: false });
});

test('a redirect loop is ELOOP, not an endless chase', async (t) => {
  const server = await serve(t, data);
  server.redirects.set('/a', '/b');
  server.redirects.set('/b', '/a');
  const e = await t.throwsAsync<BlockError>(openSpec(`${server.base}/a`, { readOnly: true }));
  t.is(e!.code, 'ELOOP');
  t.regex(e!.message, /more than 10 redirects/);
  t.true(server.log.length <= 12);
});

test('a presigned URL (HEAD refused with 403) is read with its query, and its signature is never printed', async (t) => {
  const server = await serve(t, data);
  const signature = 'f00dfacecafe1234deadbeef';
  server.faults.requireQuery = `X-Amz-Signature=${signature}`;
  server.faults.refuseHead = true;
  server.faults.refuseHeadStatus = 403;
  const url = `${server.base}/disk.img?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=3600&X-Amz-Signature=${signature}`;
  const p = await open(t, url);
  t.is(p.info().size, data.length);
  t.deepEqual(await readAt(p, 5000, 3000), data.subarray(5000, 8000));
  const printed = JSON.stringify({ location: p.location, describe: p.describe!() });
  t.false(printed.includes(signature), printed);
  t.regex(printed, /X-Amz-Signature=REDACTED/);

  const info = await cli(['info', url]);
  t.is(info.code, 0, info.stderr);
  t.false((info.stdout + info.stderr).includes(signature));
  // A wrong signature: refused, and the message shows neither signature.
  const wrong = await cli(['info', url.replace(signature, 'a0a0a0a0a0a0')]);
  t.is(wrong.code, 1);
  t.regex(wrong.stderr, /refused access \(HTTP 403\)/);
  t.false(wrong.stderr.includes('a0a0a0a0a0a0') || wrong.stderr.includes(signature), wrong.stderr);
});

test('a certificate for another host name is refused even when its CA is trusted, and says so', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-tls-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const key = path.join(dir, 'key.pem');
  const cert = path.join(dir, 'cert.pem');
  await must('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=images.example', '-addext', 'subjectAltName=DNS:images.example']);
  const server = await serve(t, data, { key: fs.readFileSync(key, 'utf8'), cert: fs.readFileSync(cert, 'utf8') });
  const e = await t.throwsAsync<BlockError>(openSpec(`http,ca=${cert}:${server.base}/disk.img`, { readOnly: true }));
  t.is(e!.code, 'EIO');
  t.regex(e!.message, /TLS certificate refused: it is not for host 127\.0\.0\.1/);
  t.is(server.log.length, 0, 'no request went over the connection');
});

test('an expired certificate is refused even when its CA is trusted, and says so', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-tls-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const openssl = (args: string[]) => must('openssl', args, { cwd: dir });
  // A CA, and a server certificate it signed that was valid for one day in 2020.
  await openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=tapkit test CA']);
  await openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'srv.key', '-out', 'srv.csr', '-subj', '/CN=127.0.0.1']);
  fs.mkdirSync(path.join(dir, 'db'));
  fs.writeFileSync(path.join(dir, 'db/index.txt'), '');
  fs.writeFileSync(path.join(dir, 'db/serial'), '01\n');
  fs.writeFileSync(
    path.join(dir, 'ca.cnf'),
    '[ca]\ndefault_ca=c\n[c]\ndatabase=db/index.txt\nnew_certs_dir=db\nserial=db/serial\ndefault_md=sha256\npolicy=p\nx509_extensions=ext\n[p]\ncommonName=supplied\n[ext]\nsubjectAltName=IP:127.0.0.1\n',
  );
  await openssl(['ca', '-batch', '-config', 'ca.cnf', '-cert', 'ca.pem', '-keyfile', 'ca.key', '-in', 'srv.csr', '-out', 'srv.pem', '-startdate', '20200101000000Z', '-enddate', '20200102000000Z']);
  const server = await serve(t, data, { key: fs.readFileSync(path.join(dir, 'srv.key'), 'utf8'), cert: fs.readFileSync(path.join(dir, 'srv.pem'), 'utf8') });
  const e = await t.throwsAsync<BlockError>(openSpec(`http,ca=${path.join(dir, 'ca.pem')}:${server.base}/disk.img`, { readOnly: true }));
  t.is(e!.code, 'EIO');
  t.regex(e!.message, /TLS certificate refused: outside its validity dates \(CERT_HAS_EXPIRED\)/);
  t.is(server.log.length, 0, 'no request went over the connection');
});
