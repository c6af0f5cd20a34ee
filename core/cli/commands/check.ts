/**
 * `tapkit check SPEC [--json]`: every format's structural checks over the whole chain,
 * without serving or opening it as a disk (core/inspect.ts). Exit 1 when an image has a
 * problem or a reference would not open.
 */
import type { Command } from 'commander';
import { Inspector } from '../../inspect';
import { redactSpec } from '../../redact';
import { addOpenOptions, openOptionsFor, type OpenCliOptions } from '../context';
import { inspectionText } from '../inspection';

export function register(program: Command): void {
  addOpenOptions(
    program
      .command('check')
      .argument('<spec>', 'the image: /path/disk.qcow2, vhd:/path/disk.vhd, qcow2:https://host/x.qcow2, ...')
      .description('check the structure of an image and its chain without serving it (exit 1 on any problem)'),
  )
    .option('--json', 'print JSON')
    .action(async (spec: string, options: OpenCliOptions & { json?: boolean }) => {
      const inspection = await new Inspector({ ...openOptionsFor(options), check: true }).inspect(spec);
      const problems = inspection.images.reduce((n, image) => n + (image.problems?.length ?? 0) + (image.error ? 1 : 0), 0);
      const sound = problems === 0 && inspection.wouldOpen;
      if (options.json) process.stdout.write(`${JSON.stringify({ spec: redactSpec(spec), sound, ...inspection }, null, 2)}\n`);
      else process.stdout.write(`${[...inspectionText(inspection, true), `problems: ${problems}`].join('\n')}\n`);
      if (!sound) process.exitCode = 1;
    });
}
