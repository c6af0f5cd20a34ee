import test from 'ava';
import { parseSpec } from '../core/spec';
import { parseSize } from '../core/size';
import { SpecError } from '../core/errors';

test('named specs carry options and their argument', (t) => {
  t.deepEqual(parseSpec('memory,limit=64M:1G'), { type: 'named', name: 'memory', options: { limit: '64M' }, arg: '1G' });
  t.deepEqual(parseSpec('vhd:/images/a.vhd'), { type: 'named', name: 'vhd', options: {}, arg: '/images/a.vhd' });
  t.deepEqual(parseSpec('qcow2:https://h/x.qcow2'), { type: 'named', name: 'qcow2', options: {}, arg: 'https://h/x.qcow2' });
});

test('URLs and paths are recognised', (t) => {
  t.deepEqual(parseSpec('https://h/x.qcow2'), { type: 'url', scheme: 'https', url: 'https://h/x.qcow2' });
  t.deepEqual(parseSpec('/a/b:c'), { type: 'path', path: '/a/b:c' });
  t.deepEqual(parseSpec('./a:b'), { type: 'path', path: './a:b' });
  t.deepEqual(parseSpec('disk.img'), { type: 'path', path: 'disk.img' });
});

test('sizes parse with binary suffixes and refuse nonsense', (t) => {
  t.is(parseSize('1G'), 2 ** 30);
  t.is(parseSize('512k'), 512 * 1024);
  t.is(parseSize('64MiB'), 64 * 2 ** 20);
  t.is(parseSize('4096'), 4096);
  t.throws(() => parseSize('12Q'), { instanceOf: SpecError });
  t.throws(() => parseSize('16E'), { instanceOf: SpecError });
  t.throws(() => parseSize('-1'), { instanceOf: SpecError });
});
