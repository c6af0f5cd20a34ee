/** `tapkit providers [--json]`: every registered provider with its kind, capabilities and description. */
import type { Command } from 'commander';
import { registry } from '../../registry';

export function register(program: Command): void {
  program
    .command('providers')
    .description('list the registered providers (built-in and loaded with --plugin)')
    .option('--json', 'print JSON')
    .action((options: { json?: boolean }) => {
      const entries = registry().list().map(({ declaration: d, cls }) => ({
        name: d.name,
        kind: d.kind,
        description: d.description,
        capabilities: capabilitiesOf(cls.prototype),
        ...(d.schemes ? { schemes: d.schemes } : {}),
        ...(d.options?.length ? { options: d.options } : {}),
        probes: !!d.probe,
      }));
      if (options.json) {
        process.stdout.write(`${JSON.stringify(entries, null, 2)}\n`);
        return;
      }
      const width = Math.max(...entries.map((e) => e.name.length), 4);
      for (const e of entries) {
        process.stdout.write(`${e.name.padEnd(width)}  ${e.kind.padEnd(6)}  ${e.capabilities.join(',').padEnd(40)}  ${e.description}\n`);
      }
    });
}

/** What a provider class implements, read from its prototype (before any instance exists). */
function capabilitiesOf(prototype: Record<string, unknown>): string[] {
  const operations = ['read', 'write', 'flush', 'trim', 'zero', 'extents'];
  return operations.filter((op) => typeof prototype[op] === 'function');
}
