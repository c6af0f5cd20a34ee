/**
 * How many rounds a bench runs: ROUNDS in the environment. REPS, the older name some
 * benches used, is still read (with a warning) so existing command lines keep working.
 */
export function roundsFromEnv(fallback = 3, env: NodeJS.ProcessEnv = process.env): number {
  const rounds = env.ROUNDS;
  const reps = env.REPS;
  let text = rounds;
  if (reps !== undefined && rounds === undefined) {
    process.stderr.write('warning: REPS is deprecated, use ROUNDS (read as ROUNDS this time)\n');
    text = reps;
  } else if (reps !== undefined && rounds !== undefined && reps !== rounds) {
    process.stderr.write(`warning: REPS is deprecated and ignored: ROUNDS=${rounds} wins over REPS=${reps}\n`);
  }
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1) throw new Error(`ROUNDS must be a whole number of at least 1 (got '${text}')`);
  return n;
}
