/**
 * The daemon's `xen` export kind: serves a daemon device to one blkif frontend.
 *
 *   xen:DOMID/DEVID[,platform=KIND:ARG][,type=vbd|qdisk|vbd3][,grants=auto|copy|map][,attach]
 *
 * The device becomes the backend of vbd DEVID of domain DOMID on the platform (default
 * `xen`, a real dom0; `platform=sim:DIR` for the sim platform, which then runs inside
 * the daemon, shared by every export that names the same DIR). Without `attach` the
 * toolstack has written the vbd's nodes already (xl, its hotplug script, or `tapkit xen
 * attach`), and the device is served whatever `params` says. With `attach` the export
 * writes them itself (xl block-attach's part) and removes them when it stops (block-detach's).
 *
 * `type` picks the backend directory (backend-types.ts; default vbd), `grants` how
 * request data moves (grant-copy.ts; default auto).
 *
 * Stopping the export (destroy) drains the ring; an attached vbd is then detached (the
 * frontend is asked to close, bounded), otherwise the backend state goes to Closed.
 */
import { registerExportKind, type ExportHandle } from '../daemon/exports';
import { BlockError } from '../errors';
import type { Vbd } from '../vbd';
import { BlkifDevice, DEFAULT_LIMITS, XenbusState } from './device';
import { inTransaction } from './platform';
import { acquirePlatform, GRANT_ACCESS, type GrantAccess } from './platforms';
import { BACKEND_TYPES, isBackendType, type BackendType } from './backend-types';
import { attach, backendPath, detach, frontendPath } from './toolstack';

export interface XenExportArgument {
  domid: number;
  devid: number;
  platform: string;
  attach: boolean;
  type: BackendType;
  grants: GrantAccess;
}

/** How long a stopping export waits for the frontend to close an attached vbd. */
const DETACH_TIMEOUT_MS = 10_000;

export function parseXenExport(argument: string): XenExportArgument {
  const usage = `expected xen:DOMID/DEVID[,platform=KIND:ARG][,type=TYPE][,grants=HOW][,attach], got 'xen:${argument}'`;
  const [vbd, ...options] = argument.split(',');
  const m = /^(\d+)\/(\d+)$/.exec(vbd ?? '');
  if (!m) throw new BlockError('EINVAL', usage);
  const domid = Number(m[1]);
  const devid = Number(m[2]);
  if (domid < 1 || domid > 0x7fef) throw new BlockError('EINVAL', `xen export: domain ${domid} is not a guest domain (1..32751)`);
  if (devid > 2 ** 31 - 1) throw new BlockError('EINVAL', `xen export: device ${devid} is out of range`);
  const parsed: XenExportArgument = { domid, devid, platform: 'xen', attach: false, type: 'vbd', grants: 'auto' };
  for (const option of options) {
    if (option === 'attach') parsed.attach = true;
    else if (option.startsWith('type=')) {
      const type = option.slice('type='.length);
      if (!isBackendType(type)) throw new BlockError('EINVAL', `xen export: type '${type}' is not one of ${BACKEND_TYPES.join(', ')}`);
      parsed.type = type;
    } else if (option.startsWith('grants=')) {
      const grants = option.slice('grants='.length);
      if (!(GRANT_ACCESS as readonly string[]).includes(grants)) throw new BlockError('EINVAL', `xen export: grants '${grants}' is not one of ${GRANT_ACCESS.join(', ')}`);
      parsed.grants = grants as GrantAccess;
    }
    else if (option.startsWith('platform=') && option.length > 'platform='.length) parsed.platform = option.slice('platform='.length);
    else throw new BlockError('EINVAL', `xen export: unknown option '${option}' (${usage})`);
  }
  return parsed;
}

async function startXenExport(vbd: Vbd, argument: string, context: { deviceId: string; log: { info(m: string): void; warn(m: string): void } }): Promise<ExportHandle> {
  const options = parseXenExport(argument);
  const { domid, devid } = options;
  let shared;
  try {
    shared = await acquirePlatform(options.platform, { grants: options.grants, log: (m) => context.log.info(m) });
  } catch (e) {
    throw new BlockError('EINVAL', `xen export: ${(e as Error).message}`);
  }
  const { platform, release } = shared;
  const store = platform.store;
  const be = backendPath(domid, devid, options.type);
  let device: BlkifDevice | undefined;
  let created = false;
  try {
    if (options.attach) {
      await attach(store, { domid, devid, spec: `tapkit-device:${context.deviceId}`, readOnly: vbd.info().readOnly, type: options.type }).catch((e: Error) => {
        throw new BlockError('EEXIST', `xen export: ${e.message}`);
      });
      created = true;
    } else if ((await store.read(`${be}/frontend`)) === undefined) {
      throw new BlockError('ENOENT', `xen export: no vbd at ${be} (add ',attach' to have the export create its nodes)`);
    }
    device = new BlkifDevice({
      platform,
      backendPath: be,
      domid,
      devid,
      vbd,
      limits: DEFAULT_LIMITS,
      log: (m) => context.log.info(m),
    });
    await device.start();
  } catch (e) {
    await device?.shutdown().catch(() => undefined);
    if (created) {
      await inTransaction(store, async (tx) => {
        await store.rm(be, tx);
        await store.rm(frontendPath(domid, devid), tx);
      }).catch(() => undefined);
    }
    await release();
    throw e;
  }
  const served = device;
  let closing: Promise<void> | undefined;
  return {
    kind: 'xen',
    target: `${options.platform} ${be}`,
    stats: () => ({ ...served.stats(), ended: served.hasEnded }),
    close: () =>
      (closing ??= (async () => {
        try {
          if (options.attach) {
            // online=0: the device asks the frontend to close, reaches Closed and ends.
            const closed = await detach(store, domid, devid, DETACH_TIMEOUT_MS, options.type).catch(() => false);
            if (!closed) context.log.warn(`vbd ${domid}/${devid}: the frontend did not close within ${DETACH_TIMEOUT_MS / 1000} s`);
            await served.shutdown();
          } else {
            await served.shutdown();
            if ((await store.read(`${be}/state`)) !== undefined) await store.write(`${be}/state`, String(XenbusState.Closed));
          }
        } finally {
          await release();
        }
      })()),
  };
}

registerExportKind('xen', startXenExport);
