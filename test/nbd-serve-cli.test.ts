/**
 * `tapkit serve` as a program: the embedded default, argument parsing, usage errors, and
 * graceful shutdown (running requests finish, data is flushed to the file, exit 0; a
 * second SIGINT exits at once).
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseExportArg, parseHostPort } from '../core/cli/commands/serve';
import { serve, sleep } from './helpers/nbd';
import { RawClient } from './helpers/raw-nbd';
import { CLI, must, run } from './helpers/run';
import { tempDir } from './helpers/temp';

test('export arguments: NAME=SPEC or a bare spec', (t) => {
  t.deepEqual(parseExportArg('memory:1G'), { name: '', spec: 'memory:1G' });
  t.deepEqual(parseExportArg('disk=memory:1G'), { name: 'disk', spec: 'memory:1G' });
  t.deepEqual(parseExportArg('=memory:1G'), { name: '', spec: 'memory:1G' });
  t.deepEqual(parseExportArg('memory,limit=64M:1G'), { name: '', spec: 'memory,limit=64M:1G' });
  t.deepEqual(parseExportArg('d=memory,limit=64M:1G'), { name: 'd', spec: 'memory,limit=64M:1G' });
  t.deepEqual(parseExportArg('./a=b.img'), { name: '', spec: './a=b.img' });
  t.throws(() => parseExportArg('x='));
  t.deepEqual(parseHostPort('127.0.0.1:10809'), { host: '127.0.0.1', port: 10809 });
  t.deepEqual(parseHostPort('[::1]:0'), { host: '::1', port: 0 });
  t.deepEqual(parseHostPort(':10809'), { host: '0.0.0.0', port: 10809 });
  t.throws(() => parseHostPort('localhost'));
});

test('usage errors exit 2 with one line', async (t) => {
  for (const args of [['--connections', '0'], ['--max-request', '1'], ['--tls-cert', '/nonexistent'], ['a=memory:1M', 'a=memory:2M'], ['--listen', 'nohost']]) {
    const r = await run(process.execPath, [CLI, 'serve', ...args], { timeoutMs: 30_000 });
    t.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    t.regex(r.stderr, /^tapkit: .+\n$/);
  }
  const missing = await run(process.execPath, [CLI, 'serve', '--socket', path.join(tempDir(t), 's'), '/nonexistent/disk.img'], { timeoutMs: 30_000 });
  t.is(missing.code, 1, missing.stderr);
  t.regex(missing.stderr, /no such file/);
});

test('tapkit serve with no export: a sparse memory:1G disk on a default Unix socket', async (t) => {
  const runtime = tempDir(t, 'tapkit-runtime-');
  const server = await serve(t, [], { env: { ...process.env, XDG_RUNTIME_DIR: runtime } });
  const socketPath = path.join(runtime, 'tapkit', 'nbd.sock');
  t.is(server.uri, `nbd+unix:///?socket=${socketPath}`);
  t.true(server.stdout().includes(`try: qemu-img info 'nbd+unix:///?socket=${socketPath}'`), server.stdout());
  const info = JSON.parse(await must('qemu-img', ['info', '--output=json', server.uri]));
  t.is(info['virtual-size'], 1024 ** 3);
  const map = JSON.parse(await must('nbdinfo', ['--map', '--json', server.uri]));
  t.deepEqual(map, [{ offset: 0, length: 1024 ** 3, type: 3, description: 'hole,zero' }]);
  t.is(await server.stop('SIGINT'), 0);
  t.false(fs.existsSync(socketPath), 'the socket file is removed');
});

test('SIGTERM: running writes finish and reach the file, then exit 0', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'disk.raw');
  await must('truncate', ['-s', '64M', file]);
  const socketPath = path.join(dir, 's');
  const server = await serve(t, ['--socket', socketPath, `raw:${file}`]);
  const client = await RawClient.connect({ path: socketPath });
  t.teardown(() => client.destroy());
  await client.greet();
  await client.go('');
  // 32 writes of 1 MiB, then the signal while they are running.
  const payloads = Array.from({ length: 32 }, (_, i) => Buffer.alloc(1024 * 1024, i + 1));
  payloads.forEach((p, i) => client.sendRequest(1, i * 1024 * 1024, p.length, BigInt(i), 0, p));
  const first = await client.readSimpleReply();
  t.is(first.error, 0);
  server.process.kill('SIGTERM');
  const answered = [first.cookie];
  for (;;) {
    try {
      const reply = await client.readSimpleReply();
      t.is(reply.error, 0);
      answered.push(reply.cookie);
    } catch {
      break; // the server closed the connection after the last running request
    }
  }
  t.is(await server.exited, 0, server.stderr());
  const disk = fs.readFileSync(file);
  for (const cookie of answered) {
    const i = Number(cookie);
    t.true(disk.subarray(i * 1024 * 1024, (i + 1) * 1024 * 1024).equals(payloads[i]), `write ${i} is in the file`);
  }
});

test('a second SIGINT exits at once', async (t) => {
  const socketPath = path.join(tempDir(t), 's');
  const server = await serve(t, ['--socket', socketPath, 'memory:64M']);
  // A client that never reads keeps a graceful shutdown waiting.
  const client = await RawClient.connect({ path: socketPath });
  t.teardown(() => client.destroy());
  await client.greet();
  await client.go('');
  client.socket.pause();
  for (let i = 0; i < 64; i++) client.sendRequest(0, 0, 1024 * 1024, BigInt(i));
  await sleep(500);
  server.process.kill('SIGINT');
  await sleep(300);
  server.process.kill('SIGINT');
  t.is(await server.exited, 130);
});
