/** `tapkit info SPEC [--json]`: size, format, the provider chain, capabilities, allocation. */
import type { Command } from 'commander';
import { redactSpec } from '../../redact';
import { formatSize } from '../../size';
import { addOpenOptions, withProvider, type OpenCliOptions } from '../context';
import { chainText, formatOf, layersOf } from '../layers';

export function register(program: Command): void {
  addOpenOptions(
    program
      .command('info')
      .argument('<spec>', 'the disk: memory:1G, /path/image.vhd, qcow2:https://host/x.qcow2, ...')
      .description('show what a spec opens: size, format, provider chain, capabilities'),
  )
    .option('--json', 'print JSON')
    .action(async (spec: string, options: OpenCliOptions & { json?: boolean }) => {
      await withProvider(spec, { ...options, readOnly: true }, async (top) => {
        const info = top.info();
        const caps = top.capabilities();
        const layers = layersOf(top);
        const allocated = top.allocatedBytes ? await top.allocatedBytes() : undefined;
        const report = {
          // Never print credentials a URL carries.
          spec: redactSpec(spec),
          size: info.size,
          format: formatOf(layers),
          logicalBlockSize: info.logicalBlockSize,
          physicalBlockSize: info.physicalBlockSize,
          chain: layers,
          capabilities: caps,
          allocatedBytes: allocated ?? null,
        };
        if (options.json) {
          process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
          return;
        }
        const capList = Object.entries(caps).filter(([, v]) => v).map(([k]) => k).join(', ') || 'none';
        const out = [
          `spec:            ${report.spec}`,
          `virtual size:    ${formatSize(info.size)} (${info.size} bytes)`,
          `format:          ${report.format}`,
          `block sizes:     logical ${info.logicalBlockSize}, physical ${info.physicalBlockSize}`,
          `allocated:       ${allocated === undefined ? 'unknown' : `${formatSize(allocated)} (${allocated} bytes)`}`,
          `capabilities:    ${capList}`,
          'chain:',
          ...chainText(layers, '  '),
        ];
        for (const layer of layers) {
          for (const [k, v] of Object.entries(layer.details ?? {})) out.push(`  ${layer.provider}.${k}: ${typeof v === 'object' ? JSON.stringify(v) : v}`);
        }
        process.stdout.write(`${out.join('\n')}\n`);
      });
    });
}
