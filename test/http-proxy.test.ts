/**
 * The http source through an http proxy, as curl and qemu-img (libcurl) go through one:
 * the rules that pick the proxy (http_proxy, https_proxy, all_proxy, no_proxy, the
 * `proxy` option and --proxy), then a real tinyproxy between tapkit and nginx (http,
 * absolute-form requests) and between tapkit and a TLS server (a CONNECT tunnel), with
 * proxy credentials that are used but never printed.
 */
import test from 'ava';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import '../providers';
import { openSpec } from '../core/open';
import { bypassesProxy, connectRequest, parseProxy, proxyFor } from '../providers/http/proxy';
import { requestHead } from '../providers/http/connection';
import { FaultServer } from './helpers/fault-server';
import { startNginx } from './helpers/nginx';
import { must, tapkit } from './helpers/run';
import { tempDir } from './helpers/temp';
import { startTinyproxy, type Tinyproxy } from './helpers/tinyproxy';

const PROXY_VARIABLES = ['http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY', 'no_proxy', 'NO_PROXY'];

/** The test's environment without any proxy setting, plus `extra`. */
function envWith(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env = { ...process.env };
  for (const name of PROXY_VARIABLES) delete env[name];
  return { ...env, ...extra };
}

const url = (text: string) => new URL(text);

test('which proxy: http_proxy (lower case only) for http, https_proxy or HTTPS_PROXY for https, all_proxy for both', (t) => {
  const http = url('http://images.example/disk.img');
  const https = url('https://images.example/disk.img');
  t.is(proxyFor(http, undefined, {}), undefined);
  t.is(proxyFor(http, undefined, { http_proxy: 'http://p:3128' })?.url.href, 'http://p:3128/');
  t.is(proxyFor(http, undefined, { HTTP_PROXY: 'http://p:3128' }), undefined, 'HTTP_PROXY can come from a CGI request header: ignored, as curl does');
  t.is(proxyFor(https, undefined, { http_proxy: 'http://p:3128' }), undefined);
  t.is(proxyFor(https, undefined, { HTTPS_PROXY: 'p2:8080' })?.url.href, 'http://p2:8080/', 'host:port is an http proxy');
  t.is(proxyFor(https, undefined, { https_proxy: 'http://a:1', HTTPS_PROXY: 'http://b:1' })?.url.hostname, 'a');
  t.is(proxyFor(https, undefined, { ALL_PROXY: 'http://all:1' })?.url.hostname, 'all');
  t.is(proxyFor(http, undefined, { all_proxy: 'http://all:1', http_proxy: 'http://own:1' })?.url.hostname, 'own');
  t.is(proxyFor(http, undefined, { http_proxy: '  ' }), undefined, 'an empty variable is no proxy');
});

test('the proxy option wins over the environment; none means direct', (t) => {
  const target = url('http://images.example/disk.img');
  const env = { http_proxy: 'http://env:1' };
  t.is(proxyFor(target, 'http://opt:2', env)?.url.hostname, 'opt');
  t.is(proxyFor(target, 'none', env), undefined);
  t.is(proxyFor(target, 'http://opt:2', { ...env, no_proxy: '*' })?.url.hostname, 'opt', 'no_proxy is for the environment only');
});

test('no_proxy: *, host names with their subdomains, leading dots, IP addresses, ports', (t) => {
  const at = (u: string, list: string) => bypassesProxy(url(u), list);
  t.true(at('http://a.example/x', '*'));
  t.true(at('http://images.example/x', 'images.example'));
  t.true(at('http://eu.images.example/x', 'images.example'));
  t.true(at('http://eu.images.example/x', '.images.example'));
  t.false(at('http://badimages.example/x', 'images.example'), 'a suffix match needs a dot');
  t.true(at('http://127.0.0.1:8080/x', 'localhost, 127.0.0.1'));
  t.false(at('http://127.0.0.10/x', '127.0.0.1'));
  t.true(at('http://h.example:8080/x', 'h.example:8080'));
  t.false(at('http://h.example:9090/x', 'h.example:8080'));
  t.true(at('https://h.example/x', 'h.example:443'));
  t.true(at('http://[::1]:8080/x', '::1'));
  t.true(at('http://[::1]:8080/x', '[::1]:8080'));
  t.false(at('http://a.example/x', ''));
  t.is(proxyFor(url('http://127.0.0.1/x'), undefined, { http_proxy: 'http://p:1', NO_PROXY: '127.0.0.1' }), undefined);
});

test('only http proxies: https and SOCKS proxies are refused by name; credentials become Proxy-Authorization', (t) => {
  t.throws(() => parseProxy('https://p:443', 'https_proxy'), { message: /only http:\/\/ proxies.*https:/ });
  t.throws(() => parseProxy('socks5://p:1080', 'all_proxy'), { message: /only http:\/\/ proxies.*socks5:/ });
  const p = parseProxy('http://al%40ce:pa%3Ass@p:3128', 'x');
  t.is(p.authorization, `Basic ${Buffer.from('al@ce:pa:ss').toString('base64')}`);
  t.is(connectRequest(url('https://h.example/disk'), p), `CONNECT h.example:443 HTTP/1.1\r\nhost: h.example:443\r\nproxy-authorization: ${p.authorization}\r\n\r\n`);
  const head = requestHead({ method: 'GET', path: '/d?x=1', headers: { range: 'bytes=0-1' } }, url('http://h.example:81'), p);
  t.true(head.startsWith(`GET http://h.example:81/d?x=1 HTTP/1.1\r\nhost: h.example:81\r\nproxy-authorization: ${p.authorization}\r\n`), head);
  const tunnelled = requestHead({ method: 'GET', path: '/d', headers: {} }, url('https://h.example'), p);
  t.true(tunnelled.startsWith('GET /d HTTP/1.1\r\nhost: h.example\r\n') && !tunnelled.includes('proxy-authorization'), 'inside a tunnel the origin never sees the proxy credentials');
});

/** A self-signed certificate for 127.0.0.1, made by openssl. */
async function certificate(t: { teardown(fn: () => void): void }): Promise<{ key: string; cert: string; certPath: string }> {
  const dir = tempDir(t, 'tapkit-proxy-cert-');
  const certPath = path.join(dir, 'cert.pem');
  await must('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', path.join(dir, 'key.pem'), '-out', certPath, '-days', '2', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1']);
  return { key: fs.readFileSync(path.join(dir, 'key.pem'), 'utf8'), cert: fs.readFileSync(certPath, 'utf8'), certPath };
}

async function proxy(t: { teardown(fn: () => Promise<void>): void }, options: { basicAuth?: string } = {}): Promise<Tinyproxy> {
  const p = await startTinyproxy(options);
  t.teardown(() => p.stop());
  return p;
}

test('through tinyproxy from http_proxy: a qcow2 image made by qemu-img on nginx converts equal to the local image', async (t) => {
  const dir = tempDir(t, 'tapkit-proxy-');
  const root = path.join(dir, 'www');
  fs.mkdirSync(root);
  const raw = path.join(dir, 'source.raw');
  fs.writeFileSync(raw, crypto.randomBytes(4 << 20));
  await must('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, path.join(root, 'disk.qcow2')]);
  const nginx = await startNginx(root);
  t.teardown(() => nginx.stop());
  const tp = await proxy(t);
  const env = envWith({ http_proxy: tp.url });
  const out = path.join(dir, 'out.raw');
  const converted = await tapkit(['convert', `qcow2:${nginx.base}/disk.qcow2`, out], { env, timeoutMs: 120_000 });
  t.is(converted.code, 0, converted.stderr);
  await must('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', raw, out]);
  t.true(tp.requests().some((r) => r === `GET ${nginx.base}/disk.qcow2`), `tinyproxy forwarded the ranges: ${tp.requests().slice(0, 5).join('; ')}`);
  const info = await tapkit(['info', '--json', `${nginx.base}/disk.qcow2`], { env });
  t.is(info.code, 0, info.stderr);
  t.is(JSON.parse(info.stdout).chain.at(-1).details.proxy, tp.url, 'tapkit info names the proxy');

  // no_proxy and --proxy none go direct: tinyproxy sees nothing more.
  const before = tp.requests().length;
  for (const [args, extra] of [
    [['info', `${nginx.base}/disk.qcow2`], { no_proxy: '127.0.0.1' }],
    [['info', '--proxy', 'none', `${nginx.base}/disk.qcow2`], {}],
  ] as const) {
    const direct = await tapkit(args, { env: { ...env, ...extra } });
    t.is(direct.code, 0, direct.stderr);
  }
  t.is(tp.requests().length, before, 'no request went through the proxy');
});

test('https through a CONNECT tunnel (https_proxy, --ca for the origin): the bytes equal; the proxy sees only CONNECT', async (t) => {
  const dir = tempDir(t, 'tapkit-proxy-tls-');
  const tls = await certificate(t);
  const cert = tls.certPath;
  const data = crypto.randomBytes(3 << 20);
  const server = await new FaultServer().start(tls);
  t.teardown(() => server.stop());
  server.put('/disk.img', data);
  const tp = await proxy(t);
  const out = path.join(dir, 'out.raw');
  const r = await tapkit(['convert', '--ca', cert, `${server.base}/disk.img`, out], { env: envWith({ HTTPS_PROXY: tp.url }), timeoutMs: 120_000 });
  t.is(r.code, 0, `${r.signal ?? ''} ${r.stderr}`);
  t.true(fs.readFileSync(out).equals(data));
  const port = new URL(server.base).port;
  t.true(tp.requests().length > 0 && tp.requests().every((req) => req === `CONNECT 127.0.0.1:${port}`), tp.requests().join('; '));
  t.true(server.log.some((req) => req.range !== undefined), 'the ranged GETs reached the origin inside the tunnel');
});

test('a proxy that wants credentials: refused with 407 and a hint; with them in the URL it works; the password is never printed', async (t) => {
  const dir = tempDir(t, 'tapkit-proxy-auth-');
  const root = path.join(dir, 'www');
  fs.mkdirSync(root);
  const data = crypto.randomBytes(1 << 20);
  fs.writeFileSync(path.join(root, 'disk.img'), data);
  const nginx = await startNginx(root);
  t.teardown(() => nginx.stop());
  const tp = await proxy(t, { basicAuth: 'alice:Pr0xyPass' });

  // http: tinyproxy answers the GET itself with 407.
  const refused = await tapkit(['info', `${nginx.base}/disk.img`], { env: envWith({ http_proxy: tp.url }) });
  t.is(refused.code, 1);
  t.regex(refused.stderr, /407/);
  const withAuth = `http://alice:Pr0xyPass@127.0.0.1:${tp.port}`;
  const out = path.join(dir, 'out.raw');
  const ok = await tapkit(['convert', '--proxy', withAuth, `${nginx.base}/disk.img`, out], { env: envWith({}) });
  t.is(ok.code, 0, ok.stderr);
  t.true(fs.readFileSync(out).equals(data));
  const info = await tapkit(['info', '--json', `${nginx.base}/disk.img`], { env: envWith({ http_proxy: withAuth }) });
  t.is(info.code, 0, info.stderr);
  t.is(JSON.parse(info.stdout).chain[0].details.proxy, tp.url, 'shown without its credentials');
  const wrong = await tapkit(['info', '--proxy', `http://alice:WrongPass@127.0.0.1:${tp.port}`, `${nginx.base}/disk.img`], { env: envWith({}) });
  t.is(wrong.code, 1);
  for (const r of [refused, ok, info, wrong]) t.false(/Pr0xyPass|WrongPass/.test(r.stdout + r.stderr), 'no password in any output');
});

test('https through a proxy that wants credentials: 407 to CONNECT is EACCES naming the proxy, not retried', async (t) => {
  const server = await new FaultServer().start(await certificate(t));
  t.teardown(() => server.stop());
  server.put('/disk.img', Buffer.alloc(4096, 7));
  const tp = await proxy(t, { basicAuth: 'alice:Pr0xyPass' });
  const e = await t.throwsAsync(openSpec(`http,retries=3,proxy=${encodeURIComponent(tp.url)}:${server.base}/disk.img`, { readOnly: true, warn: () => {} }));
  t.is((e as NodeJS.ErrnoException).code, 'EACCES');
  t.regex(e!.message, new RegExp(`proxy ${tp.url.replace(/\./g, '\\.')} answered 407 .*CONNECT 127\\.0\\.0\\.1:\\d+.*credentials`));
  t.is(tp.requests().length, 1, 'asked once: a 407 is not retried');
});

test('a proxy that is down: the error names the proxy after the retries', async (t) => {
  const tp = await startTinyproxy();
  const port = tp.port;
  await tp.stop();
  const e = await t.throwsAsync(openSpec(`http,retries=1,timeout=10,proxy=${encodeURIComponent(`http://127.0.0.1:${port}`)}:http://images.example/disk.img`, { readOnly: true, warn: () => {} }));
  t.regex(e!.message, new RegExp(`ECONNREFUSED.*through proxy http://127\\.0\\.0\\.1:${port}.*gave up after 2 tries`));
});

test('a proxy option that is not an http proxy URL is a usage error naming the spec, not the value', async (t) => {
  const e = await t.throwsAsync(openSpec(`http,proxy=${encodeURIComponent('socks5://u:secretword@p:1080')}:http://images.example/disk.img`, { readOnly: true, warn: () => {} }));
  t.regex(e!.message, /only http:\/\/ proxies/);
  t.false(e!.message.includes('secretword'));
});
