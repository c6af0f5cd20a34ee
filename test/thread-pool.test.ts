/** The one rule for sizing libuv's pool (core/cli/thread-pool.ts): unset → preferred, too small → minimum, larger → kept. */
import test from 'ava';
import { sizeThreadPool, threadPoolSizeFor } from '../core/cli/thread-pool';

const need = { minimum: 8, preferred: 128 };

test('unset, empty or nonsense values take the preferred size', (t) => {
  for (const v of [undefined, '', '  ', 'many', '-3', '0', '2.5']) t.is(threadPoolSizeFor(v, need), 128, String(v));
});

test('a value below the minimum is raised to it, never lowered', (t) => {
  t.is(threadPoolSizeFor('2', need), 8);
  t.is(threadPoolSizeFor('8', need), 8);
  t.is(threadPoolSizeFor('12', need), 12, 'the caller may choose fewer than preferred, if one mount fits');
  t.is(threadPoolSizeFor('300', need), 300);
});

test("libuv's upper bound (1024) is kept", (t) => {
  t.is(threadPoolSizeFor('5000', need), 1024);
  t.is(threadPoolSizeFor(undefined, { minimum: 8, preferred: 4096 }), 1024);
});

test('sizeThreadPool writes the result into the environment it is given', (t) => {
  const env: NodeJS.ProcessEnv = { UV_THREADPOOL_SIZE: '4' };
  sizeThreadPool({ minimum: 16, preferred: 16 }, env);
  t.is(env.UV_THREADPOOL_SIZE, '16');
});
