/** Sizes as users write them: `4096`, `512K`, `1G`, `1.5T`, `64MiB`. Powers of 1024. */
import { SpecError } from './errors';

const UNITS: Record<string, number> = { '': 1, B: 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50, E: 2 ** 60 };

/** `spec`, when given, is named in the error (`malformed memory size '12Q' in spec 'memory:12Q'`). */
export function parseSize(text: string, what = 'size', spec?: string): number {
  const where = spec === undefined ? '' : ` in spec '${spec}'`;
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:i?B)?\s*$/i.exec(text);
  if (!m) throw new SpecError('EINVAL', `malformed ${what} '${text}'${where} (expected a number with an optional K, M, G, T, P or E suffix)`, true);
  const value = Number(m[1]) * UNITS[m[2].toUpperCase()];
  if (!Number.isSafeInteger(value)) throw new SpecError('EOVERFLOW', `${what} '${text}'${where} is not a whole number of bytes below 2^53`, true);
  return value;
}

export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${Number.isInteger(value) ? value : value.toFixed(1)} ${units[unit]}`;
}
