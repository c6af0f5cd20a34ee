/**
 * `tapkit xen qemu-stub [--platform P] [--grant-access A] -- QEMU-ARGUMENTS`: what libxl
 * runs as a PV guest's device model when the xl config says
 * `device_model_override="/path/to/wrapper"` (examples/xen/tapkit-qemu-dm). It serves the
 * guest's qdisk disks, speaks enough QMP for libxl, and exits when libxl kills it
 * (core/ring/qemu-stub.ts has what libxl expects).
 */
import type { Command } from 'commander';
import { Vbd } from '../../vbd';
import { DEFAULT_LIMITS } from '../../ring/device';
import { parsePlatform, startPlatform } from '../../ring/platforms';
import { parseQemuArguments, QemuStub } from '../../ring/qemu-stub';
import { addOpenOptions, openerFor, UsageError, type OpenCliOptions } from '../context';
import { grantAccess } from './xen';

export function registerQemuStub(xen: Command): void {
  addOpenOptions(
    xen
      .command('qemu-stub')
      .description("a PV guest's device model in QEMU's place: serves its backend/qdisk disks (xl: device_model_override)")
      .argument('[qemu-arguments...]', 'the QEMU command line libxl passes (after --)')
      .option('--platform <platform>', 'xen (a dom0) or sim:DIR', 'xen')
      .option('--grant-access <how>', 'auto, copy or map (see xen serve)', 'auto'),
  ).action(async (qemuArguments: string[], options: OpenCliOptions & { platform: string; grantAccess: string }) => {
    let args;
    try {
      parsePlatform(options.platform);
      args = parseQemuArguments(qemuArguments);
    } catch (e) {
      throw new UsageError((e as Error).message);
    }
    const log = (m: string) => process.stderr.write(`tapkit xen: ${m}\n`);
    log(`qemu-stub for domain ${args.domid}${args.name ? ` (${args.name})` : ''}: ${qemuArguments.join(' ')}`);
    const platform = await startPlatform(options.platform, { grants: grantAccess(options.grantAccess), log });
    const stub = new QemuStub(platform, args, {
      limits: DEFAULT_LIMITS,
      log,
      openVbd: async (spec, readOnly) => new Vbd(await openerFor({ ...options, readOnly }).open(spec), { readOnly, name: spec }),
    });
    try {
      await stub.start();
      await new Promise<void>((resolve) => {
        for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.once(signal, () => resolve());
        void stub.quit.then(resolve);
      });
    } finally {
      await stub.stop();
      await platform.close();
    }
    log(`qemu-stub for domain ${args.domid}: stopped`);
  });
}
