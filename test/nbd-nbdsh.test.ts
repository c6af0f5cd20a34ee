/**
 * The NBD export driven command by command through libnbd's Python binding (what nbdsh
 * runs): structured replies with data and hole chunks, DF, BLOCK_STATUS with and without
 * REQ_ONE, CACHE, WRITE_ZEROES with NO_HOLE and FAST_ZERO, FUA and FLUSH, error replies,
 * and many requests in flight at once.
 */
import test from 'ava';
import { TRANSPORTS, listenArgs, nbdPython, serve } from './helpers/nbd';

const PRELUDE = `
M = 1024 * 1024
K = 64 * 1024
def expect_error(code, fn, *args):
    try:
        fn(*args)
    except nbd.Error as e:
        assert e.errnum == code, f"{fn.__name__}{args[1:] if len(args) > 1 else ''}: expected {errno.errorcode[code]}, got {e.errno}: {e.string}"
        return e.string
    raise AssertionError(f"{fn.__name__} did not fail")
`;

for (const transport of TRANSPORTS) {
  test(`structured reads, block status, cache, zeroes, flush (${transport})`, async (t) => {
    const server = await serve(t, [...listenArgs(t, transport), 'memory:64M']);
    const out = await nbdPython(t, server.uri, `${PRELUDE}
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(uri)
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
assert h.can_fast_zero() and h.can_cache() and h.can_df() and h.can_multi_conn()
assert h.get_size() == 64 * M

h.pwrite(b"\\x07" * K, M, nbd.CMD_FLAG_FUA)
chunks = []
def chunk(sub, offset, status, err):
    chunks.append((offset, len(sub), status))
    return 0
buf = h.pread_structured(3 * K, M - K, chunk)
assert buf == bytes(K) + b"\\x07" * K + bytes(K), "structured read content"
assert sorted(chunks) == [(M - K, K, nbd.READ_HOLE), (M, K, nbd.READ_DATA), (M + K, K, nbd.READ_HOLE)], chunks

chunks.clear()
buf = h.pread_structured(3 * K, M - K, chunk, nbd.CMD_FLAG_DF)
assert buf == bytes(K) + b"\\x07" * K + bytes(K)
assert chunks == [(M - K, 3 * K, nbd.READ_DATA)], chunks

extents = []
def extent(context, offset, entries, err):
    extents.append((context, offset, list(entries)))
    return 0
h.block_status(4 * M, 0, extent)
assert extents == [("base:allocation", 0, [M, 3, K, 0, 3 * M - K, 3])], extents
extents.clear()
h.block_status(4 * M, 0, extent, nbd.CMD_FLAG_REQ_ONE)
assert extents == [("base:allocation", 0, [M, 3])], extents
extents.clear()
h.block_status(10, M + 100, extent, nbd.CMD_FLAG_REQ_ONE)
assert extents == [("base:allocation", M + 100, [10, 0])], extents

h.cache(M, 0)
h.cache(64 * M, 0)

h.pwrite(b"\\x09" * (2 * M), 8 * M)
h.zero(4096, 8 * M, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(2 * M, 8 * M) == bytes(4096) + b"\\x09" * (2 * M - 4096)
h.zero(100, 9 * M, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
assert h.pread(200, 9 * M - 50) == b"\\x09" * 50 + bytes(100) + b"\\x09" * 50
h.trim(M, 9 * M)
h.flush()
h.shutdown()
print("ok")
`);
    t.is(out.trim(), 'ok');
    t.is(await server.stop(), 0);
  });

  test(`error replies: bounds, sizes, read-only, requests without negotiation (${transport})`, async (t) => {
    const server = await serve(t, [...listenArgs(t, transport), 'memory:64M']);
    const out = await nbdPython(t, server.uri, `${PRELUDE}
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.set_strict_mode(0)   # let libnbd send what the server must refuse
h.connect_uri(uri)
size = h.get_size()
expect_error(errno.EINVAL, h.pread, 512, size - 256)
expect_error(errno.ENOSPC, h.pwrite, b"x" * 512, size - 256)
expect_error(errno.EINVAL, h.trim, 512, size - 256)
expect_error(errno.ENOSPC, h.zero, 512, size - 256)
expect_error(errno.EINVAL, h.cache, 512, size - 256)
expect_error(errno.EINVAL, h.block_status, 512, size - 256, lambda *a: 0)
expect_error(errno.EINVAL, h.pread, 32 * M + 1, 0)
expect_error(errno.EOVERFLOW, h.pread, 32 * M + 1, 0, nbd.CMD_FLAG_DF)
expect_error(errno.EINVAL, h.pwrite, b"\\x01" * (32 * M + 1), 0)
# After all that the connection still works, and the refused write changed nothing.
assert h.pread(4096, 0) == bytes(4096)
h.pwrite(b"ok", 5)
assert h.pread(2, 5) == b"ok"
h.shutdown()

# Without structured replies: simple replies, and BLOCK_STATUS is refused.
s = nbd.NBD()
s.set_request_structured_replies(False)
s.set_strict_mode(0)
s.connect_uri(uri)
assert not s.get_structured_replies_negotiated()
assert s.pread(2, 5) == b"ok"
expect_error(errno.EINVAL, s.pread, 512, size - 256)
expect_error(errno.EINVAL, s.block_status, 512, 0, lambda *a: 0)
s.shutdown()
print("ok")
`);
    t.is(out.trim(), 'ok');
    t.is(await server.stop(), 0);

    const readOnly = await serve(t, [...listenArgs(t, transport), '--read-only', 'memory:4M']);
    const ro = await nbdPython(t, readOnly.uri, `${PRELUDE}
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(uri)
assert h.is_read_only()
expect_error(errno.EPERM, h.pwrite, b"x" * 512, 0)
expect_error(errno.EPERM, h.trim, 512, 0)
expect_error(errno.EPERM, h.zero, 512, 0)
assert h.pread(512, 0) == bytes(512)
h.flush()
print("ok")
`);
    t.is(ro.trim(), 'ok');
    t.is(await readOnly.stop(), 0);
  });

  test(`many requests in flight on one connection (${transport})`, async (t) => {
    const server = await serve(t, [...listenArgs(t, transport), 'memory:64M']);
    const out = await nbdPython(t, server.uri, `${PRELUDE}
h = nbd.NBD()
h.connect_uri(uri)
# 200 writes of distinct patterns, all issued before any is waited for.
for i in range(200):
    h.aio_pwrite(bytes([i % 251 + 1]) * 70001, i * 100003)
while h.aio_in_flight() > 0:
    h.poll(-1)
bufs = [nbd.Buffer(70001) for i in range(200)]
cookies = [h.aio_pread(bufs[i], i * 100003) for i in range(200)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for i in range(200):
    assert h.aio_command_completed(cookies[i])
    data = bufs[i].to_bytearray()
    assert data == bytes([i % 251 + 1]) * 70001, i
h.flush()
print("ok")
`);
    t.is(out.trim(), 'ok');
    t.is(await server.stop(), 0);
  });
}
