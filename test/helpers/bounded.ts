/**
 * Fails instead of hanging: resolves or rejects as `promise` does, or rejects with
 * "WHAT did not finish within MS ms" once `ms` have passed. For code under test that must
 * end on any input (the corrupt-image tests); external programs are bounded by ./run instead.
 */
export async function bounded<T>(promise: Promise<T>, what: string, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}
