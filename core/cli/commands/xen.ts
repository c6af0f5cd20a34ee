/**
 * `tapkit xen ...`: the blkif backend and its toolstack verbs (docs/xen.md).
 *   serve  --platform sim:DIR|xen [--backend-type vbd|qdisk|vbd3] [--grant-access auto|copy|map]
 *                                           serve every device that appears under backend/TYPE
 *   attach --platform sim:DIR|xen --domid N --devid V [--backend-type T] [--read-only] SPEC
 *                                           (xl block-attach's part; on a dom0, for vbd3)
 *   detach --platform sim:DIR|xen --domid N --devid V [--backend-type T]   (xl block-detach's part)
 *   qemu-stub [--platform P] -- QEMU-ARGS  a PV guest's device model serving its qdisks (xen-qemu-stub.ts)
 */
import type { Command } from 'commander';
import { BlkifBackend } from '../../ring/backend';
import { DEFAULT_LIMITS } from '../../ring/device';
import { BACKEND_TYPES, isBackendType, type BackendType } from '../../ring/backend-types';
import { connectStore, GRANT_ACCESS, parsePlatform, startPlatform, type GrantAccess, type StoreConnection } from '../../ring/platforms';
import { registerQemuStub } from './xen-qemu-stub';
import { attach, detach } from '../../ring/toolstack';
import { Vbd } from '../../vbd';
import { addOpenOptions, openerFor, UsageError, type OpenCliOptions } from '../context';

/** Checks `--platform` before anything starts (a usage error, exit 2). */
function platformSpec(spec: string | undefined): string {
  if (!spec) throw new UsageError('--platform KIND:ARGUMENT is required (sim:DIR)');
  try {
    parsePlatform(spec);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  if (spec === 'sim:' || spec === 'sim') throw new UsageError('the sim platform needs a directory: sim:DIR');
  return spec;
}

function integer(value: string | undefined, name: string, min: number, max: number): number {
  const n = value !== undefined && /^\d+$/.test(value) ? Number(value) : NaN;
  if (!Number.isInteger(n) || n < min || n > max) throw new UsageError(`${name} must be a whole number in ${min}..${max} (got '${value}')`);
  return n;
}

export function backendType(value: string | undefined): BackendType {
  const type = value ?? 'vbd';
  if (!isBackendType(type)) throw new UsageError(`--backend-type must be one of ${BACKEND_TYPES.join(', ')} (got '${type}')`);
  return type;
}

export function grantAccess(value: string | undefined): GrantAccess {
  const access = value ?? 'auto';
  if (!(GRANT_ACCESS as readonly string[]).includes(access)) throw new UsageError(`--grant-access must be one of ${GRANT_ACCESS.join(', ')} (got '${access}')`);
  return access as GrantAccess;
}

async function withStore<T>(spec: string, fn: (client: StoreConnection) => Promise<T>): Promise<T> {
  const client = await connectStore(spec);
  try {
    return await fn(client);
  } finally {
    client.close();
  }
}

export function register(program: Command): void {
  const xen = program.command('xen').description('the Xen PV block (blkif) backend');

  addOpenOptions(
    xen
      .command('serve')
      .description('serve every vbd that appears in XenStore under /local/domain/0/backend/vbd (or backend/TYPE)')
      .requiredOption('--platform <platform>', 'xen (this Linux dom0, docs/xen-lab.md) or sim:DIR (files and sockets in DIR, see docs/xen.md)')
      .option('--backend-type <type>', `the backend directory to serve: ${BACKEND_TYPES.join(', ')}`, 'vbd')
      .option('--grant-access <how>', 'request data by grant copy or by mapping: auto (copy on a Linux dom0), copy, map', 'auto')
      .option('--max-ring-page-order <n>', 'largest ring a frontend may use (log2 pages)', String(DEFAULT_LIMITS.maxRingPageOrder))
      .option('--max-queues <n>', 'most queues a frontend may use', String(DEFAULT_LIMITS.maxQueues))
      .option('--max-indirect-segments <n>', 'segments per indirect request (0: no indirect)', String(DEFAULT_LIMITS.maxIndirectSegments))
      .option('--quiet', 'do not log device events'),
  ).action(async (options: OpenCliOptions & { platform: string; backendType: string; grantAccess: string; maxRingPageOrder: string; maxQueues: string; maxIndirectSegments: string; quiet?: boolean }) => {
    const spec = platformSpec(options.platform);
    const type = backendType(options.backendType);
    const grants = grantAccess(options.grantAccess);
    const limits = {
      maxRingPageOrder: integer(options.maxRingPageOrder, '--max-ring-page-order', 0, 4),
      maxQueues: integer(options.maxQueues, '--max-queues', 1, 64),
      maxIndirectSegments: integer(options.maxIndirectSegments, '--max-indirect-segments', 0, 4096),
    };
    const log = options.quiet ? undefined : (m: string) => process.stderr.write(`tapkit xen: ${m}\n`);
    const platform = await startPlatform(spec, { grants, log });
    const backend = new BlkifBackend({
      platform,
      type,
      limits,
      log,
      openVbd: async (spec, readOnly) => {
        const provider = await openerFor({ ...options, readOnly }).open(spec);
        return new Vbd(provider, { readOnly, name: spec });
      },
    });
    await backend.start();
    process.stdout.write(`tapkit xen: serving ${spec}${type === 'vbd' ? '' : ` backend/${type}`}\n`);
    await new Promise<void>((resolve) => {
      const stop = () => resolve();
      process.once('SIGINT', stop);
      process.once('SIGTERM', stop);
    });
    await backend.close();
    await platform.close();
  });

  xen
    .command('attach')
    .description("create a vbd's backend and frontend nodes (xl block-attach's part)")
    .argument('<spec>', 'the disk the backend serves (a tapkit spec)')
    .requiredOption('--platform <platform>', 'sim:DIR, or xen (this dom0: for vbd3, which xl cannot make)')
    .requiredOption('--domid <n>', 'the guest domain')
    .requiredOption('--devid <n>', 'the virtual-device number (51712 is xvda)')
    .option('--backend-type <type>', `the backend directory: ${BACKEND_TYPES.join(', ')}`, 'vbd')
    .option('--read-only', 'attach read-only (mode=r)')
    .action(async (spec: string, options: { platform: string; domid: string; devid: string; backendType: string; readOnly?: boolean }) => {
      const platform = platformSpec(options.platform);
      const type = backendType(options.backendType);
      const domid = integer(options.domid, '--domid', 1, 0x7fef);
      const devid = integer(options.devid, '--devid', 0, 2 ** 31 - 1);
      await withStore(platform, (client) => attach(client, { domid, devid, spec, readOnly: !!options.readOnly, type }));
    });

  xen
    .command('detach')
    .description("set online=0, wait for the backend to close, remove the vbd's nodes (xl block-detach's part)")
    .requiredOption('--platform <platform>', 'sim:DIR, or xen (this dom0)')
    .requiredOption('--domid <n>', 'the guest domain')
    .requiredOption('--devid <n>', 'the virtual-device number')
    .option('--backend-type <type>', `the backend directory: ${BACKEND_TYPES.join(', ')}`, 'vbd')
    .option('--timeout <seconds>', 'how long to wait for the backend to close', '10')
    .action(async (options: { platform: string; domid: string; devid: string; backendType: string; timeout: string }) => {
      const platform = platformSpec(options.platform);
      const type = backendType(options.backendType);
      const domid = integer(options.domid, '--domid', 1, 0x7fef);
      const devid = integer(options.devid, '--devid', 0, 2 ** 31 - 1);
      const seconds = integer(options.timeout, '--timeout', 0, 3600);
      const closed = await withStore(platform, (client) => detach(client, domid, devid, seconds * 1000, type));
      if (!closed) process.stderr.write(`tapkit xen: the backend of vbd ${domid}/${devid} did not reach Closed within ${seconds}s; its nodes were removed anyway\n`);
    });

  registerQemuStub(xen);
}
