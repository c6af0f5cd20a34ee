/**
 * The daemon's configuration file (JSON):
 *
 *   {
 *     "control": "/run/tapkit/control.sock",
 *     "metrics": "127.0.0.1:9101",
 *     "log": { "level": "info" },
 *     "limits": { "maxChainDepth": 16, "allowBacking": ["/srv/images"], "l1-size": 67108864 },
 *     "devices": [
 *       { "name": "vm1", "spec": "vhd:/srv/images/vm1.vhd", "exports": ["nbd:/run/tapkit/vm1.sock"] }
 *     ]
 *   }
 *
 * Devices are matched by name on reload (SIGHUP).
 */
import * as fs from 'node:fs';
import { SpecError } from '../errors';
import { isLimitName, type LimitValues } from '../limits';
import { isLevel, type Level } from './log';
import type { DeviceRequest } from './devices';

export interface DaemonConfig {
  control?: string;
  metrics?: string;
  log?: { level?: Level };
  /** maxChainDepth, allowBacking, and any resource limit of core/limits.ts by its name (`"l1-size": 67108864`). */
  limits?: { maxChainDepth?: number; allowBacking?: string[]; values?: Partial<LimitValues> };
  devices: Array<DeviceRequest & { name: string }>;
}

export function readConfig(file: string): DaemonConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new SpecError('ENOENT', `cannot read config '${file}': ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, true);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new SpecError('EINVAL', `config '${file}' is not valid JSON: ${(e as Error).message}`, true);
  }
  return validateConfig(raw, file);
}

export function validateConfig(raw: unknown, file = 'config'): DaemonConfig {
  const bad = (what: string) => new SpecError('EINVAL', `config '${file}': ${what}`, true);
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw bad('the top level must be an object');
  const c = raw as Record<string, unknown>;
  const known = ['control', 'metrics', 'log', 'limits', 'devices'];
  for (const key of Object.keys(c)) if (!known.includes(key)) throw bad(`unknown key '${key}' (known: ${known.join(', ')})`);
  if (c.control !== undefined && typeof c.control !== 'string') throw bad("'control' must be a path");
  if (c.metrics !== undefined && typeof c.metrics !== 'string') throw bad("'metrics' must be HOST:PORT");
  const log = (c.log ?? {}) as Record<string, unknown>;
  if (log.level !== undefined && (typeof log.level !== 'string' || !isLevel(log.level))) throw bad("'log.level' must be debug, info, warn or error");
  const limits = (c.limits ?? {}) as Record<string, unknown>;
  if (limits.maxChainDepth !== undefined && !Number.isInteger(limits.maxChainDepth)) throw bad("'limits.maxChainDepth' must be an integer");
  if (limits.allowBacking !== undefined && !(Array.isArray(limits.allowBacking) && limits.allowBacking.every((d) => typeof d === 'string'))) {
    throw bad("'limits.allowBacking' must be a list of paths or URL prefixes");
  }
  const values: Partial<LimitValues> = {};
  for (const [key, value] of Object.entries(limits)) {
    if (key === 'maxChainDepth' || key === 'allowBacking') continue;
    if (!isLimitName(key)) throw bad(`unknown limit 'limits.${key}'`);
    if (!Number.isSafeInteger(value) || (value as number) < 0) throw bad(`'limits.${key}' must be a whole number`);
    values[key] = value as number;
  }
  const devices = c.devices ?? [];
  if (!Array.isArray(devices)) throw bad("'devices' must be a list");
  const names = new Set<string>();
  const out: DaemonConfig['devices'] = devices.map((d, i) => {
    if (typeof d !== 'object' || d === null) throw bad(`devices[${i}] must be an object`);
    const entry = d as Record<string, unknown>;
    for (const key of Object.keys(entry)) if (!['name', 'spec', 'exports', 'readOnly', 'filters'].includes(key)) throw bad(`devices[${i}]: unknown key '${key}'`);
    if (typeof entry.name !== 'string' || entry.name === '') throw bad(`devices[${i}] needs a 'name'`);
    if (names.has(entry.name)) throw bad(`two devices are named '${entry.name}'`);
    names.add(entry.name);
    if (typeof entry.spec !== 'string' || entry.spec === '') throw bad(`devices[${i}] ('${entry.name}') needs a 'spec'`);
    for (const list of ['exports', 'filters'] as const) {
      if (entry[list] !== undefined && !(Array.isArray(entry[list]) && (entry[list] as unknown[]).every((x) => typeof x === 'string'))) {
        throw bad(`devices[${i}].${list} must be a list of strings`);
      }
    }
    if (entry.readOnly !== undefined && typeof entry.readOnly !== 'boolean') throw bad(`devices[${i}].readOnly must be true or false`);
    return {
      name: entry.name,
      spec: entry.spec,
      exports: (entry.exports as string[] | undefined) ?? [],
      filters: (entry.filters as string[] | undefined) ?? [],
      readOnly: !!entry.readOnly,
    };
  });
  return {
    control: c.control as string | undefined,
    metrics: c.metrics as string | undefined,
    log: { level: log.level as Level | undefined },
    limits: { maxChainDepth: limits.maxChainDepth as number | undefined, allowBacking: limits.allowBacking as string[] | undefined, values },
    devices: out,
  };
}

/** True when two device entries would produce the same device (a reload leaves it alone). */
export function sameDevice(a: DeviceRequest, b: DeviceRequest): boolean {
  return JSON.stringify([a.spec, a.exports ?? [], a.filters ?? [], !!a.readOnly]) === JSON.stringify([b.spec, b.exports ?? [], b.filters ?? [], !!b.readOnly]);
}
