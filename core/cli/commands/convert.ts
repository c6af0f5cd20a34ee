/**
 * `tapkit convert SRC DST [-O raw|vhd] [-o OPTIONS] [--progress]`: copies any disk to a
 * sparse raw file (or a block device) or a new VHD (convert-targets.ts).
 */
import * as fs from 'node:fs';
import type { Command } from 'commander';
import { copyVbd } from '../../copy';
import { BlockError } from '../../errors';
import type { Provider } from '../../provider';
import { Opener } from '../../open';
import { redactSpec } from '../../redact';
import { Vbd } from '../../vbd';
import { addOpenOptions, collect, openerFor, UsageError, type OpenCliOptions } from '../context';
import { checkDeviceTarget, creationOptions, outputFormat } from '../convert-targets';
import { progressBar } from '../progress';

export function register(program: Command): void {
  addOpenOptions(
    program
      .command('convert')
      .argument('<src>', 'the disk to copy (any spec)')
      .argument('<dst>', 'the file to write (created or replaced), or a block device (raw only)')
      .description('copy a disk to a raw file or a VHD, keeping it sparse'),
  )
    .option('-O, --output-format <format>', 'output format: raw, or vhd (vpc)', 'raw')
    .option('-o, --options <key=value,...>', 'creation options of the output format: vhd takes subformat=dynamic|fixed, block_size=SIZE', collect, [])
    .option('--progress', 'show a progress bar on a terminal')
    .action(async (src: string, dst: string, options: OpenCliOptions & { outputFormat: string; options: string[]; progress?: boolean }) => {
      const format = outputFormat(options.outputFormat);
      const created = creationOptions(options.outputFormat, options.options);
      const source = new Vbd(await openerFor({ ...options, readOnly: true }).open(src), { name: redactSpec(src) });
      try {
        const existing = statOrUndefined(dst);
        if (existing && readsFrom(source.top, existing)) {
          throw new UsageError(`${dst} is what ${src} reads from: refusing to overwrite the source`);
        }
        if (existing?.isDirectory()) throw new BlockError('EISDIR', `${dst} is a directory (convert writes a file or a block device)`);
        const targetIsDevice = !!existing?.isBlockDevice();
        if (targetIsDevice) checkDeviceTarget(options.outputFormat, dst);
        // A fresh image reads as zeros everywhere: holes need no writes.
        const targetSpec = targetIsDevice ? `raw:${dst}` : format.create(dst, source.info().size, created);
        const target = new Vbd(await new Opener({}).open(targetSpec), { name: dst });
        try {
          if (target.info().size < source.info().size) {
            throw new UsageError(`${dst} holds ${target.info().size} bytes, less than the ${source.info().size} of ${src}`);
          }
          const bar = options.progress && process.stderr.isTTY ? progressBar(process.stderr) : undefined;
          await copyVbd(source, target, { targetIsZero: !targetIsDevice, onProgress: bar?.update });
          bar?.done();
        } finally {
          await target.close();
        }
      } finally {
        await source.close();
      }
    });
}

function statOrUndefined(file: string): fs.Stats | undefined {
  try {
    return fs.statSync(file);
  } catch {
    return undefined;
  }
}

/** True when any layer of the chain (or its backing chains) reads the file `target` is. */
function readsFrom(top: Provider | undefined, target: fs.Stats): boolean {
  for (let p = top; p; p = p.lower) {
    const here = p.location && !/^[a-z][a-z0-9+.-]*:\/\//i.test(p.location) ? statOrUndefined(p.location) : undefined;
    if (here && here.dev === target.dev && here.ino === target.ino) return true;
    if (p.backing && readsFrom(p.backing, target)) return true;
  }
  return false;
}
