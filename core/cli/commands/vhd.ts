/**
 * `tapkit vhd ...`: the vhd-util verbs people use.
 *
 *   create PATH --size S [--type fixed|dynamic] [--block-size B]
 *   snapshot CHILD --parent SPEC     a differencing child of a VHD
 *   info PATH [--json]               footer, header, allocation, parent chain
 *   check PATH                       every problem; exit 1 if any
 *   coalesce CHILD                   merge a child into its parent (crash-safe)
 *   resize PATH --size S             grow
 */
import * as path from 'node:path';
import type { Command } from 'commander';
import { parseSize, formatSize } from '../../size';
import { checkImage } from '../../../providers/vhd/check';
import { coalesceChild } from '../../../providers/vhd/coalesce';
import { createChild, createImage } from '../../../providers/vhd/create';
import { diskTypeName, DiskType } from '../../../providers/vhd/footer';
import { VhdProvider } from '../../../providers/vhd/provider';
import { resizeImage } from '../../../providers/vhd/resize';
import { uuidText } from '../../../providers/vhd/uuid';
import type { Provider } from '../../provider';
import { addOpenOptions, openerFor, UsageError, withProvider, type OpenCliOptions } from '../context';

export function register(program: Command): void {
  const vhd = program.command('vhd').description('create, inspect, check, snapshot, coalesce and grow VHD images');

  vhd
    .command('create')
    .argument('<path>', 'the image to create (never overwritten)')
    .requiredOption('--size <size>', 'virtual size (512-byte multiple, at most 2040G)')
    .option('--type <type>', 'fixed or dynamic', 'dynamic')
    .option('--block-size <size>', 'dynamic block size (power of two)', '2M')
    .description('create a fixed or dynamic VHD')
    .action((file: string, options: { size: string; type: string; blockSize: string }) => {
      if (options.type !== 'fixed' && options.type !== 'dynamic') throw new UsageError(`--type must be fixed or dynamic (got '${options.type}')`);
      const size = createImage(file, { size: parseSize(options.size, '--size'), type: options.type, blockSize: parseSize(options.blockSize, '--block-size') });
      process.stdout.write(`created ${options.type} VHD ${file}, ${formatSize(size)} (${size} bytes)\n`);
    });

  addOpenOptions(
    vhd
      .command('snapshot')
      .argument('<child>', 'the differencing image to create')
      .requiredOption('--parent <spec>', 'the parent VHD (a path or a vhd: spec)')
      .option('--block-size <size>', 'block size of the child (default: the parent\'s)')
      .description('create a differencing child of a VHD'),
  ).action(async (child: string, options: OpenCliOptions & { parent: string; blockSize?: string }) => {
    await withProvider(options.parent, { ...options, readOnly: true }, async (parent) => {
      const vhdParent = asVhd(parent, options.parent);
      const parentPath = vhdParent.location;
      if (!parentPath || /^[A-Za-z][A-Za-z0-9+.-]*:\/\//.test(parentPath)) throw new UsageError(`the parent ${options.parent} must be a local file`);
      createChild(child, {
        path: parentPath,
        uniqueId: vhdParent.uniqueId,
        size: vhdParent.info().size,
        blockSize: vhdParent.type === DiskType.Fixed ? undefined : vhdParent.blockSize,
      }, options.blockSize ? parseSize(options.blockSize, '--block-size') : undefined);
      process.stdout.write(`created differencing VHD ${child} over ${path.relative(path.dirname(path.resolve(child)), parentPath) || parentPath}\n`);
    });
  });

  addOpenOptions(
    vhd
      .command('info')
      .argument('<path>', 'the image')
      .option('--json', 'print JSON')
      .description('footer, header, allocation and parent chain of a VHD'),
  ).action(async (file: string, options: OpenCliOptions & { json?: boolean }) => {
    await withProvider(`vhd:${file}`, { ...options, readOnly: true }, async (top) => {
      const chain: Array<Record<string, unknown>> = [];
      for (let p: Provider | undefined = top; p; p = p.backing) {
        chain.push(p instanceof VhdProvider ? imageFacts(p) : { location: p.location, provider: p.name, size: p.info().size });
      }
      if (options.json) {
        process.stdout.write(`${JSON.stringify({ image: chain[0], parents: chain.slice(1) }, null, 2)}\n`);
        return;
      }
      const lines: string[] = [];
      chain.forEach((facts, depth) => {
        lines.push(depth === 0 ? `${file}` : `${'  '.repeat(depth - 1)}parent: ${facts.location}`);
        for (const [k, v] of Object.entries(facts)) {
          if (k === 'location' && depth > 0) continue;
          lines.push(`${'  '.repeat(depth)}  ${k.padEnd(18)} ${typeof v === 'object' ? JSON.stringify(v) : v}`);
        }
      });
      process.stdout.write(`${lines.join('\n')}\n`);
    });
  });

  addOpenOptions(
    vhd
      .command('check')
      .argument('<path>', 'the image')
      .description('list every problem of a VHD (exit 1 if there is any)'),
  ).action(async (file: string, options: OpenCliOptions) => {
    const report = await checkImage(file, openerFor({ ...options, readOnly: true }));
    if (report.problems.length === 0) {
      const extra = report.unreferencedBytes ? ` (${report.unreferencedBytes} bytes allocated but unreferenced, harmless)` : '';
      process.stdout.write(`${file}: no problems found${extra}\n`);
      return;
    }
    for (const p of report.problems) process.stdout.write(`${file}: ${p.field}: ${p.message}\n`);
    process.stdout.write(`${file}: ${report.problems.length} problem(s)\n`);
    process.exitCode = 1;
  });

  addOpenOptions(
    vhd
      .command('coalesce')
      .argument('<child>', 'the differencing image to merge into its parent')
      .description('write a child\'s sectors into its parent (crash-safe: rerun after an interruption)'),
  ).action(async (child: string, options: OpenCliOptions) => {
    const result = await coalesceChild(child, openerFor({ ...options, readOnly: true }), openerFor({ ...options, readOnly: false }));
    process.stdout.write(`merged ${formatSize(result.mergedBytes)} of ${child} into ${result.parent}; ${child} is now redundant and may be deleted\n`);
  });

  vhd
    .command('resize')
    .argument('<path>', 'the image')
    .requiredOption('--size <size>', 'the new (larger) virtual size')
    .description('grow a VHD')
    .action(async (file: string, options: { size: string }) => {
      const { oldSize, newSize } = await resizeImage(file, parseSize(options.size, '--size'));
      process.stdout.write(oldSize === newSize ? `${file} is already ${formatSize(newSize)}\n` : `${file}: ${formatSize(oldSize)} → ${formatSize(newSize)} (${newSize} bytes)\n`);
    });

  for (const sub of vhd.commands) sub.exitOverride().showHelpAfterError();
  vhd.exitOverride();
}

function asVhd(p: Provider, spec: string): VhdProvider {
  if (!(p instanceof VhdProvider)) throw new UsageError(`${spec} is not a VHD (it opened as ${p.name})`);
  return p;
}

function imageFacts(p: VhdProvider): Record<string, unknown> {
  const { footer, header } = p.layout;
  const facts: Record<string, unknown> = {
    location: p.location,
    type: diskTypeName(footer.diskType),
    size: footer.currentSize,
    creator: `${JSON.stringify(footer.creatorApp).slice(1, -1)} ${footer.creatorVersion >>> 16}.${footer.creatorVersion & 0xffff} (${JSON.stringify(footer.creatorHostOs).slice(1, -1)})`,
    uniqueId: uuidText(footer.uniqueId),
    geometry: footer.geometry,
    timestamp: new Date((footer.timestamp + 946684800) * 1000).toISOString(),
    savedState: !!footer.savedState,
  };
  if (p.layout.footerFromCopy) facts.footer = 'damaged at the end; the copy at offset 0 is used';
  if (p.layout.legacyFooter) facts.footer = 'legacy 511-byte footer';
  if (header) {
    const bat = p.layout.bat!;
    let allocated = 0;
    for (let i = 0; i < bat.length; i++) if (bat[i] !== 0xffffffff) allocated++;
    Object.assign(facts, {
      blockSize: header.blockSize,
      batOffset: header.tableOffset,
      batEntries: header.maxTableEntries,
      allocatedBlocks: allocated,
    });
  }
  if (footer.diskType === DiskType.Differencing) {
    Object.assign(facts, {
      parentUniqueId: uuidText(header!.parentUniqueId),
      parentName: header!.parentName,
      parentLocators: header!.locators.filter((l) => l.code).map((l) => l.code),
    });
  }
  return facts;
}
