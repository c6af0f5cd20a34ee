/** `tapkit convert SRC DST [-O raw] [--progress]`: copies any disk to a sparse raw file (or a block device). */
import * as fs from 'node:fs';
import type { Command } from 'commander';
import { copyVbd } from '../../copy';
import { Opener } from '../../open';
import { redactSpec } from '../../redact';
import { Vbd } from '../../vbd';
import { addOpenOptions, openerFor, UsageError, type OpenCliOptions } from '../context';
import { progressBar } from '../progress';

export function register(program: Command): void {
  addOpenOptions(
    program
      .command('convert')
      .argument('<src>', 'the disk to copy (any spec)')
      .argument('<dst>', 'the raw file to write (created or truncated), or a block device')
      .description('copy a disk to a raw file, keeping it sparse'),
  )
    .option('-O, --output-format <format>', 'output format', 'raw')
    .option('--progress', 'show a progress bar on a terminal')
    .action(async (src: string, dst: string, options: OpenCliOptions & { outputFormat: string; progress?: boolean }) => {
      if (options.outputFormat !== 'raw') throw new UsageError(`unsupported output format '${options.outputFormat}' (supported: raw)`);
      const source = new Vbd(await openerFor({ ...options, readOnly: true }).open(src), { name: redactSpec(src) });
      try {
        const targetIsDevice = fs.existsSync(dst) && fs.statSync(dst).isBlockDevice();
        if (!targetIsDevice) {
          // A fresh, truncated file reads as zeros everywhere: holes need no writes.
          const fd = fs.openSync(dst, 'w');
          try {
            fs.ftruncateSync(fd, source.info().size);
          } finally {
            fs.closeSync(fd);
          }
        }
        const target = new Vbd(await new Opener({}).open(`raw:${dst}`), { name: dst });
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
