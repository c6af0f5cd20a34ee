/** Medians, ranges and paired ratios (bench-method.md §3): a ratio is taken inside one round. */

export function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** "median (min–max)" with `digits` decimals; "–" for no values. */
export function fmtRange(values: number[], digits = 0): string {
  if (values.length === 0) return '–';
  const f = (x: number) => x.toFixed(digits);
  return `${f(median(values))} (${f(Math.min(...values))}–${f(Math.max(...values))})`;
}

/** mine[r] / peer[r] for each round r where both exist and the peer is non-zero. */
export function pairedRatios(mine: Array<number | undefined>, peer: Array<number | undefined>): number[] {
  const ratios: number[] = [];
  for (let r = 0; r < Math.min(mine.length, peer.length); r++) {
    const a = mine[r];
    const b = peer[r];
    if (a !== undefined && b !== undefined && b > 0) ratios.push(a / b);
  }
  return ratios;
}
