/**
 * TLS: certificates made by openssl in the test; nbdinfo reaches the export with them and
 * is refused without them; a server with a CA refuses clients without a certificate; in
 * TLS-only mode no option but STARTTLS/ABORT is answered in clear.
 */
import test, { type ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { TRANSPORTS, listenArgs, serve } from './helpers/nbd';
import { RawClient } from './helpers/raw-nbd';
import { must, run } from './helpers/run';
import { tempDir } from './helpers/temp';

/** A CA, a server certificate for localhost/127.0.0.1 and a client certificate, in libnbd's layout. */
async function makeCertificates(t: ExecutionContext): Promise<{ server: string; client: string; caOnly: string }> {
  const dir = tempDir(t, 'tapkit-tls-');
  const server = path.join(dir, 'server');
  const client = path.join(dir, 'client');
  const caOnly = path.join(dir, 'ca-only');
  for (const d of [server, client, caOnly]) fs.mkdirSync(d);
  const ossl = (...args: string[]) => must('openssl', args);
  const ca = path.join(server, 'ca-cert.pem');
  const caKey = path.join(dir, 'ca-key.pem');
  await ossl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', caKey, '-out', ca, '-days', '2', '-subj', '/CN=tapkit test CA');
  const leaf = async (name: string, subject: string, ext: string, keyOut: string, certOut: string) => {
    const csr = path.join(dir, `${name}.csr`);
    const extFile = path.join(dir, `${name}.ext`);
    fs.writeFileSync(extFile, ext);
    await ossl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', keyOut, '-out', csr, '-subj', subject);
    await ossl('x509', '-req', '-in', csr, '-CA', ca, '-CAkey', caKey, '-CAcreateserial', '-out', certOut, '-days', '2', '-extfile', extFile);
  };
  await leaf('server', '/CN=localhost', 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n', path.join(server, 'server-key.pem'), path.join(server, 'server-cert.pem'));
  await leaf('client', '/CN=tapkit test client', 'extendedKeyUsage=clientAuth\n', path.join(client, 'client-key.pem'), path.join(client, 'client-cert.pem'));
  fs.copyFileSync(ca, path.join(client, 'ca-cert.pem'));
  fs.copyFileSync(ca, path.join(caOnly, 'ca-cert.pem'));
  return { server, client, caOnly };
}

function withCerts(uri: string, dir: string): string {
  return `${uri}${uri.includes('?') ? '&' : '?'}tls-certificates=${dir}`;
}

for (const transport of TRANSPORTS) {
  test(`TLS export: reached with certificates, refused without (${transport})`, async (t) => {
    const certs = await makeCertificates(t);
    const server = await serve(
      t,
      [
        ...listenArgs(t, transport),
        '--tls-cert', path.join(certs.server, 'server-cert.pem'),
        '--tls-key', path.join(certs.server, 'server-key.pem'),
        '--tls-ca', path.join(certs.server, 'ca-cert.pem'),
        'memory:16M',
      ],
      { readyUri: (uris) => withCerts(uris[0], certs.client) },
    );
    t.regex(server.uri, /^nbds(\+unix)?:\/\//);
    const info = JSON.parse(await must('nbdinfo', ['--json', withCerts(server.uri, certs.client)]));
    t.true(info.TLS);
    t.is(info.exports[0]['export-size'], 16 * 1024 * 1024);
    const io = await must('qemu-io', [
      '--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${certs.client}`,
      '--image-opts', ...(transport === 'unix'
        ? [`driver=nbd,server.type=unix,server.path=${/socket=([^&]+)/.exec(server.uri)![1]},tls-creds=tls0,tls-hostname=localhost`]
        : [`driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${/:(\d+)\//.exec(server.uri)![1]},tls-creds=tls0`]),
      '-c', 'write -P 0x61 1000 5000', '-c', 'read -P 0x61 1000 5000',
    ]);
    t.regex(io, /read 5000\/5000/);

    // In clear: the server answers nothing but "TLS required".
    const plain = await run('nbdinfo', ['--size', server.uri.replace(/^nbds/, 'nbd')], { timeoutMs: 20_000 });
    t.not(plain.code, 0);
    // TLS without a client certificate (the server asks for one signed by its CA).
    const noClientCert = await run('nbdinfo', ['--size', withCerts(server.uri, certs.caOnly)], { timeoutMs: 20_000 });
    t.not(noClientCert.code, 0);
    t.is(await server.stop(), 0);
  });
}

test('TLS-only mode: options before STARTTLS get ERR_TLS_REQD, EXPORT_NAME is dropped', async (t) => {
  const certs = await makeCertificates(t);
  const socketPath = path.join(tempDir(t), 'tls.sock');
  const server = await serve(
    t,
    ['--socket', socketPath, '--tls-cert', path.join(certs.server, 'server-cert.pem'), '--tls-key', path.join(certs.server, 'server-key.pem'), 'secret=memory:1M'],
    { readyUri: (uris) => withCerts(uris[0], certs.client) },
  );
  // Without --tls-ca any TLS client will do, with the CA to check the server.
  const info = JSON.parse(await must('nbdinfo', ['--list', '--json', withCerts(server.uri, certs.caOnly)]));
  t.deepEqual(info.exports.map((e: { 'export-name': string }) => e['export-name']), ['secret']);

  const client = await RawClient.connect({ path: socketPath });
  t.teardown(() => client.destroy());
  await client.greet();
  for (const option of [3, 6, 7, 8, 9]) {
    client.sendOption(option, option === 3 || option === 8 ? Buffer.alloc(0) : Buffer.alloc(6));
    const reply = await client.readOptionReply();
    t.is(reply.type, 0x80000005, `option ${option}`);
    t.notRegex(reply.data.toString(), /secret/);
  }
  client.sendOption(1, Buffer.from('secret'));
  t.true(await client.closedWithin(10_000));
  t.is(await server.stop(), 0);
});
