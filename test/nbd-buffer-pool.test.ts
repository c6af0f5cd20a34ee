/** The NBD reply buffer pool: large buffers come back for reuse, foreign memory never. */
import test from 'ava';
import { BufferPool } from '../core/nbd/buffer-pool';

test('large buffers are reused once given back; foreign memory is never adopted', (t) => {
  const pool = new BufferPool(4 * 1024 * 1024);
  const first = pool.take(1024 * 1024 + 28);
  t.is(first.length, 1024 * 1024 + 28);
  first[0] = 7;
  pool.give(first);
  const second = pool.take(1024 * 1024 + 28);
  t.is(second.buffer, first.buffer, 'the same memory came back');
  // Not given back: a new take gets other memory.
  t.not(pool.take(1024 * 1024 + 28).buffer, second.buffer);

  // A slice of someone else's memory is never adopted.
  const foreign = Buffer.alloc(2 * 1024 * 1024).subarray(64 * 1024);
  pool.give(foreign);
  t.not(pool.take(foreign.length).buffer, foreign.buffer);
});

test('the pool holds at most its limit', (t) => {
  const pool = new BufferPool(3 * 1024 * 1024);
  const buffers = [0, 1, 2, 3].map(() => pool.take(1024 * 1024));
  for (const b of buffers) pool.give(b);
  const again = [0, 1, 2, 3].map(() => pool.take(1024 * 1024).buffer);
  const reused = again.filter((m) => buffers.some((b) => b.buffer === m)).length;
  t.is(reused, 3);
});
