/**
 * libuv sizes its thread pool from UV_THREADPOOL_SIZE once, when the pool first starts, so
 * a command that serves FUSE mounts sets it before anything touches the pool (the
 * program's preAction hook loads plugins, and an ES-module plugin starts the pool).
 *
 * One rule for every command: an unset value becomes the command's preferred size; an
 * inherited value too small to serve even one mount (an xl hotplug script passes on the
 * toolstack's environment, often with 8) is raised to the minimum; anything larger is the
 * caller's choice and is kept. The pool is never made smaller than the caller asked.
 */
export interface ThreadPoolNeed {
  /** Threads without which not even one mount could be served. */
  minimum: number;
  /** The size to use when the caller set none (at least `minimum`). */
  preferred: number;
}

/** libuv's own upper bound for UV_THREADPOOL_SIZE. */
const LIBUV_MAX_THREADS = 1024;

/** The pool size for `inherited` (the raw environment value) under the rule above. */
export function threadPoolSizeFor(inherited: string | undefined, need: ThreadPoolNeed): number {
  const asked = Number(inherited);
  const size = inherited === undefined || inherited.trim() === '' || !Number.isInteger(asked) || asked <= 0 ? need.preferred : asked;
  return Math.min(LIBUV_MAX_THREADS, Math.max(size, need.minimum));
}

/** Applies threadPoolSizeFor to `env` (process.env by default). */
export function sizeThreadPool(need: ThreadPoolNeed, env: NodeJS.ProcessEnv = process.env): void {
  env.UV_THREADPOOL_SIZE = String(threadPoolSizeFor(env.UV_THREADPOOL_SIZE, need));
}
