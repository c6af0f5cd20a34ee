/**
 * native/ffi.ts's prepared calls (the xen platform's hot calls: grant copy, notify,
 * unmask) against the C library: integer and pointer arguments, a pointer replaced
 * between calls, the int result; addressOf against ref-napi's own address.
 */
import test from 'ava';
import { addressOf, ffiModules, preparedFunction } from '../native/ffi';

test('a prepared call passes integers and pointers and returns the int result', (t) => {
  const abs = preparedFunction('libc.so.6', 'test', 'abs', ['int'])();
  abs.integer(0, -42);
  t.is(abs.call(), 42);
  abs.integer(0, 7);
  t.is(abs.call(), 7);

  const memset = preparedFunction('libc.so.6', 'test', 'memset', ['pointer', 'int', 'uint32'])();
  const a = Buffer.alloc(16);
  memset.pointer(0, a.subarray(4));
  memset.integer(1, 0x41);
  memset.integer(2, 3);
  memset.call();
  t.deepEqual([...a], [0, 0, 0, 0, 0x41, 0x41, 0x41, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
  // Another buffer in the same argument; the first one is left alone.
  const b = Buffer.alloc(4);
  memset.pointer(0, b);
  memset.integer(1, 0x42);
  memset.integer(2, 4);
  memset.call();
  t.deepEqual([...b], [0x42, 0x42, 0x42, 0x42]);
  t.is(a[7], 0);
});

test('a missing function fails clearly', (t) => {
  t.throws(() => preparedFunction('libc.so.6', 'the test', 'no_such_function_here', ['int'])(), { message: /the test: cannot load no_such_function_here from libc\.so\.6/ });
});

test('addressOf gives the address ref-napi gives, for views at any offset', (t) => {
  const { ref } = ffiModules('test');
  const big = Buffer.allocUnsafe(65536);
  for (const at of [0, 1, 4096, 65535]) t.is(addressOf(big.subarray(at)), ref.address(big.subarray(at)) as number);
  const small = Buffer.from('pooled');
  t.is(addressOf(small), ref.address(small) as number);
});
