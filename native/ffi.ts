/**
 * Lazy access to ffi-napi. Nothing outside native/ calls FFI; every binding here loads
 * its library on first use and fails with a clear message where the library, the
 * platform or the native module is missing.
 */
import { BlockError } from '../core/errors';

type Ffi = typeof import('ffi-napi');
type Ref = typeof import('ref-napi');

let cached: { ffi: Ffi; ref: Ref } | undefined;

export function ffiModules(what: string): { ffi: Ffi; ref: Ref } {
  if (cached) return cached;
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    cached = { ffi: require('ffi-napi') as Ffi, ref: require('ref-napi') as Ref };
    return cached;
  } catch (e) {
    throw new BlockError('ENOSYS', `${what} needs the ffi-napi native module, which failed to load: ${(e as Error).message}`);
  }
}

/** Loads a shared library's functions once, naming the library in the error if it is absent. */
export function lazyLibrary<T>(library: string | null, what: string, functions: Record<string, [string, string[]]>): () => T {
  let lib: T | undefined;
  return () => {
    if (lib) return lib;
    const { ffi } = ffiModules(what);
    try {
      lib = ffi.Library(library as string, functions as any) as unknown as T;
    } catch (e) {
      throw new BlockError('ENOSYS', `${what}: cannot load ${library ?? 'the C library'}: ${(e as Error).message}`);
    }
    return lib;
  };
}

/** The errno left by the last FFI call on this thread. */
export function lastErrno(): number {
  return ffiModules('errno').ffi.errno();
}

/** The argument types a prepared call takes (64-bit pointers, 32-bit integers). */
export type PreparedArg = 'pointer' | 'uint32' | 'int';

/**
 * A C function whose arguments live in storage allocated once, for calls on hot paths.
 * ffi-napi's own wrapper allocates a result buffer, an argument list and a buffer per
 * argument on every call and writes each through native calls; under emulation (the Xen
 * lab) that costs more than the system call it wraps. Here a call is one native call:
 * integers are written into the storage from JavaScript, a pointer argument is written
 * only when it changes (`pointer(i, buf)`: the buffer is kept alive until replaced).
 * Synchronous and not reentrant: for the event loop's thread only.
 */
export interface PreparedCall {
  /** Sets pointer argument `i` to the start of `buf` (a native write, skipped when `buf` is the one already set). */
  pointer(i: number, buf: Buffer): void;
  /** Sets integer argument `i`. */
  integer(i: number, value: number): void;
  /** Calls the function with the arguments set; returns its int result. */
  call(): number;
}

export function preparedFunction(library: string, what: string, name: string, argTypes: PreparedArg[]): () => PreparedCall {
  let prepared: PreparedCall | undefined;
  return () => {
    if (prepared) return prepared;
    const { ffi, ref } = ffiModules(what);
    let fn: Buffer;
    try {
      fn = new ffi.DynamicLibrary(library, ffi.DynamicLibrary.FLAGS.RTLD_NOW).get(name);
    } catch (e) {
      throw new BlockError('ENOSYS', `${what}: cannot load ${name} from ${library}: ${(e as Error).message}`);
    }
    const cif = ffi.CIF('int', argTypes);
    // ffi-napi's binding of libffi's ffi_call (not re-exported by its index).
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const bindings = require('ffi-napi/lib/bindings') as { ffi_call(cif: Buffer, fn: Buffer, result: Buffer, args: Buffer): void };
    const result = Buffer.alloc(8);
    const storage = Buffer.alloc(8 * argTypes.length);
    const args = Buffer.alloc(8 * argTypes.length);
    for (let i = 0; i < argTypes.length; i++) ref.writePointer(args, 8 * i, storage.subarray(8 * i, 8 * i + 8));
    const kept: Array<Buffer | undefined> = argTypes.map(() => undefined);
    prepared = {
      pointer(i, buf) {
        if (kept[i] === buf) return;
        ref.writePointer(storage, 8 * i, buf);
        kept[i] = buf;
      },
      integer(i, value) {
        if (argTypes[i] === 'int') storage.writeInt32LE(value, 8 * i);
        else storage.writeUInt32LE(value >>> 0, 8 * i);
      },
      call() {
        bindings.ffi_call(cif, fn, result, args);
        // libffi widens an int result to a full ffi_arg register.
        return result.readInt32LE(0);
      },
    };
    return prepared;
  };
}

/** Where a Buffer's bytes are in this process (one native call per ArrayBuffer, then cached). */
export function addressOf(buf: Buffer): number {
  let base = bases.get(buf.buffer);
  if (base === undefined) {
    base = (ffiModules('addresses').ref.address(buf) as number) - buf.byteOffset;
    bases.set(buf.buffer, base);
  }
  return base + buf.byteOffset;
}
const bases = new WeakMap<ArrayBufferLike, number>();
