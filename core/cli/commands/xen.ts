/**
 * `tapkit xen ...`: the blkif backend and its toolstack verbs (docs/xen.md).
 *   serve  --platform sim:DIR|xen           serve every vbd that appears under backend/vbd
 *   attach --platform sim:DIR --domid N --devid V [--read-only] SPEC   (xl block-attach's part)
 *   detach --platform sim:DIR --domid N --devid V                      (xl block-detach's part)
 */
import type { Command } from 'commander';
import { BlkifBackend } from '../../ring/backend';
import { DEFAULT_LIMITS } from '../../ring/device';
import { connectStore, parsePlatform, startPlatform, type StoreConnection } from '../../ring/platforms';
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
      .description('serve every vbd that appears in XenStore under /local/domain/0/backend/vbd')
      .requiredOption('--platform <platform>', 'xen (this Linux dom0, docs/xen-lab.md) or sim:DIR (files and sockets in DIR, see docs/xen.md)')
      .option('--max-ring-page-order <n>', 'largest ring a frontend may use (log2 pages)', String(DEFAULT_LIMITS.maxRingPageOrder))
      .option('--max-queues <n>', 'most queues a frontend may use', String(DEFAULT_LIMITS.maxQueues))
      .option('--max-indirect-segments <n>', 'segments per indirect request (0: no indirect)', String(DEFAULT_LIMITS.maxIndirectSegments))
      .option('--quiet', 'do not log device events'),
  ).action(async (options: OpenCliOptions & { platform: string; maxRingPageOrder: string; maxQueues: string; maxIndirectSegments: string; quiet?: boolean }) => {
    const spec = platformSpec(options.platform);
    const limits = {
      maxRingPageOrder: integer(options.maxRingPageOrder, '--max-ring-page-order', 0, 4),
      maxQueues: integer(options.maxQueues, '--max-queues', 1, 64),
      maxIndirectSegments: integer(options.maxIndirectSegments, '--max-indirect-segments', 0, 4096),
    };
    const platform = await startPlatform(spec);
    const log = options.quiet ? undefined : (m: string) => process.stderr.write(`tapkit xen: ${m}\n`);
    const backend = new BlkifBackend({
      platform,
      limits,
      log,
      openVbd: async (spec, readOnly) => {
        const provider = await openerFor({ ...options, readOnly }).open(spec);
        return new Vbd(provider, { readOnly, name: spec });
      },
    });
    await backend.start();
    process.stdout.write(`tapkit xen: serving ${spec}\n`);
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
    .requiredOption('--platform <platform>', 'sim:DIR')
    .requiredOption('--domid <n>', 'the guest domain')
    .requiredOption('--devid <n>', 'the virtual-device number (51712 is xvda)')
    .option('--read-only', 'attach read-only (mode=r)')
    .action(async (spec: string, options: { platform: string; domid: string; devid: string; readOnly?: boolean }) => {
      const platform = platformSpec(options.platform);
      const domid = integer(options.domid, '--domid', 1, 0x7fef);
      const devid = integer(options.devid, '--devid', 0, 2 ** 31 - 1);
      await withStore(platform, (client) => attach(client, { domid, devid, spec, readOnly: !!options.readOnly }));
    });

  xen
    .command('detach')
    .description("set online=0, wait for the backend to close, remove the vbd's nodes (xl block-detach's part)")
    .requiredOption('--platform <platform>', 'sim:DIR')
    .requiredOption('--domid <n>', 'the guest domain')
    .requiredOption('--devid <n>', 'the virtual-device number')
    .option('--timeout <seconds>', 'how long to wait for the backend to close', '10')
    .action(async (options: { platform: string; domid: string; devid: string; timeout: string }) => {
      const platform = platformSpec(options.platform);
      const domid = integer(options.domid, '--domid', 1, 0x7fef);
      const devid = integer(options.devid, '--devid', 0, 2 ** 31 - 1);
      const seconds = integer(options.timeout, '--timeout', 0, 3600);
      const closed = await withStore(platform, (client) => detach(client, domid, devid, seconds * 1000));
      if (!closed) process.stderr.write(`tapkit xen: the backend of vbd ${domid}/${devid} did not reach Closed within ${seconds}s; its nodes were removed anyway\n`);
    });
}
