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
