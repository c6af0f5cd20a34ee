/**
 * What an export advertises follows its provider chain: MULTI_CONN only where one flush
 * covers the writes of every connection, TRIM/WRITE_ZEROES/FLUSH/FUA only where the chain
 * can do them, block sizes from its geometry. Checked with nbdinfo on a test filter that
 * takes capabilities away (test/fixtures/shape-filter.ts) and on a qcow2 image made by
 * qemu-img; MULTI_CONN's promise checked with libnbd on a VHD, whose block allocation
 * table reaches the file only at a flush: writes on one connection, the flush on another,
 * the server killed, and qemu-io must find every write in the image.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { listenArgs, nbdPython, serve } from './helpers/nbd';
import { must, run } from './helpers/run';
import { tempDir } from './helpers/temp';

const MiB = 1024 * 1024;
const SHAPE = path.join(__dirname, 'fixtures', 'shape-filter.js');

async function exportInfo(uri: string): Promise<Record<string, unknown>> {
  return JSON.parse(await must('nbdinfo', ['--json', uri])).exports[0];
}

test('flags follow the chain: no multiConn, trim or zero below means no MULTI_CONN, TRIM or FAST_ZERO', async (t) => {
  const server = await serve(t, ['--plugin', SHAPE, ...listenArgs(t, 'unix'), 'shape,no=multiConn+trim+zero:memory:4M']);
  // WRITE_ZEROES stays: the VBD writes zeros itself when the chain cannot zero, but never fast.
  t.like(await exportInfo(server.uri), {
    is_read_only: false, can_multi_conn: false, can_trim: false, can_zero: true, can_fast_zero: false,
    can_flush: true, can_fua: true, can_cache: true,
  });
  // TRIM, not advertised, is refused and changes nothing; WRITE_ZEROES is emulated.
  const out = await nbdPython(t, server.uri, `
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(uri)
h.pwrite(b"\\x09" * 8192, 0)
try:
    h.trim(4096, 0)
    raise AssertionError("trim was accepted")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e.errno
assert h.pread(8192, 0) == b"\\x09" * 8192
h.zero(4096, 4096)
assert h.pread(8192, 0) == b"\\x09" * 4096 + bytes(4096)
print("refused")
`);
  t.regex(out, /refused/);
  t.is(await server.stop(), 0);
});

test('no flush below: neither FLUSH nor FUA is advertised', async (t) => {
  const server = await serve(t, ['--plugin', SHAPE, ...listenArgs(t, 'unix'), 'shape,no=flush+fua:memory:4M']);
  t.like(await exportInfo(server.uri), { can_flush: false, can_fua: false, can_trim: true, can_multi_conn: true });
  t.is(await server.stop(), 0);
});

test('block sizes from the geometry: logical is the minimum, physical the preferred', async (t) => {
  const server = await serve(t, ['--plugin', SHAPE, ...listenArgs(t, 'unix'), '--max-request', '8M', 'shape,logical=4096,physical=65536:memory:4M']);
  t.like(await exportInfo(server.uri), { block_size_minimum: 4096, block_size_preferred: 65536, block_size_maximum: 8 * MiB });
  // A client that honours the minimum still writes 512 bytes (qemu does read-modify-write).
  const out = await must('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 512 512', '-c', 'read -P 0x3c 512 512', '-c', 'read -P 0 0 512', server.uri]);
  t.notRegex(out, /Pattern verification failed/);
  t.is(await server.stop(), 0);
});

test('a qcow2 image made by qemu-img advertises 512-byte blocks and its cluster size as preferred', async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'disk.qcow2');
  await must('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=128k', image, '16M']);
  await must('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x61 1M 300k', image]);
  const server = await serve(t, [...listenArgs(t, 'unix'), image]);
  t.like(await exportInfo(server.uri), { is_read_only: true, block_size_minimum: 512, block_size_preferred: 128 * 1024, export_size: undefined });
  const out = await must('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x61 1M 300k', '-c', 'read -P 0 0 1M', server.uri]);
  t.notRegex(out, /Pattern verification failed/);
  t.is(await server.stop(), 0);
});

test('MULTI_CONN: a flush on one connection makes the writes of the others durable (VHD)', async (t) => {
  const dir = tempDir(t);
  const image = path.join(dir, 'disk.vhd');
  await must('qemu-img', ['create', '-q', '-f', 'vpc', '-o', 'subformat=dynamic', image, '64M']);
  const server = await serve(t, [...listenArgs(t, 'unix'), `vhd:${image}`]);
  // Three connections; the first two write into unallocated blocks (new BAT entries), the
  // third only flushes, after both writes were answered.
  const out = await nbdPython(t, server.uri, `
a, b, c = nbd.NBD(), nbd.NBD(), nbd.NBD()
for h in (a, b, c):
    h.connect_uri(uri)
    assert h.can_multi_conn() and h.can_flush()
a.pwrite(b"\\xa1" * 65536, 0)
b.pwrite(b"\\xb2" * 65536, 20 * 1024 * 1024)
a.pwrite(b"\\xa3" * 512, 40 * 1024 * 1024 + 1536)
# Each connection sees the others' completed writes.
assert c.pread(65536, 20 * 1024 * 1024) == b"\\xb2" * 65536
c.flush()
print("flushed")
`);
  t.regex(out, /flushed/);
  // No goodbye: the server dies at once; only what the flush made durable survives.
  server.process.kill('SIGKILL');
  await server.exited;
  const check = await must('qemu-io', [
    '-f', 'vpc', '-r',
    '-c', 'read -P 0xa1 0 64k',
    '-c', 'read -P 0xb2 20M 64k',
    '-c', 'read -P 0xa3 41944576 512',
    '-c', 'read -P 0 41943040 1536',
    image,
  ]);
  t.notRegex(check, /Pattern verification failed/);
  t.is((check.match(/^read /gm) ?? []).length, 4, check);
  t.true(fs.statSync(image).size > 3 * 65536);
  const info = await run('qemu-img', ['info', '--output=json', image]);
  t.is(JSON.parse(info.stdout)['virtual-size'] >= 64 * MiB, true);
});

test('requests of one connection run at once and are answered as they finish, out of order', async (t) => {
  // Reads covering byte 0 take 3 s; a read issued after one of them must overtake it.
  const server = await serve(t, ['--plugin', SHAPE, ...listenArgs(t, 'unix'), 'shape,delay=3000,delayat=0:memory:4M']);
  const out = await nbdPython(t, server.uri, `
import time
h = nbd.NBD()
h.connect_uri(uri)
h.pwrite(b"\\x21" * 4096, 0)
h.pwrite(b"\\x42" * 4096, 1024 * 1024)
slow_buf, fast_buf = nbd.Buffer(4096), nbd.Buffer(4096)
start = time.monotonic()
slow = h.aio_pread(slow_buf, 0)
fast = h.aio_pread(fast_buf, 1024 * 1024)
while not h.aio_command_completed(fast):
    h.poll(-1)
assert not h.aio_command_completed(slow), "the slow read finished first"
fast_at = time.monotonic() - start
while not h.aio_command_completed(slow):
    h.poll(-1)
slow_at = time.monotonic() - start
assert fast_buf.to_bytearray() == b"\\x42" * 4096 and slow_buf.to_bytearray() == b"\\x21" * 4096
assert slow_at >= 2.9, slow_at
print(f"fast {fast_at:.2f}s slow {slow_at:.2f}s")
`);
  t.regex(out, /^fast [\d.]+s slow [\d.]+s$/m);
  t.is(await server.stop(), 0);
});
