#!/usr/bin/env node
/**
 * The tapkit command line. Each command lives in ./commands/<name>.ts and exports
 * `register(program)`; this file holds the global options and error handling only.
 */
import 'reflect-metadata';
import '../../providers';
import { Command, CommanderError } from 'commander';
import { collect, globalOptions, loadPlugins, reportError, UsageError } from './context';
import * as providers from './commands/providers';
import * as info from './commands/info';
import * as convert from './commands/convert';
import * as daemon from './commands/daemon';
import * as ctl from './commands/ctl';
import * as serve from './commands/serve';
import * as mount from './commands/mount';
import * as xen from './commands/xen';
import * as vhd from './commands/vhd';

/** Every command module, in the order `tapkit --help` lists them. */
const COMMANDS: Array<{ register(program: Command): void }> = [
  providers,
  info,
  convert,
  serve,
  mount,
  xen,
  vhd,
  daemon,
  ctl,
];

export function buildProgram(): Command {
  const program = new Command('tapkit')
    .description('serve userland block-storage providers to Xen guests, the kernel and NBD clients')
    .version(require('../../../package.json').version)
    .option('--plugin <module>', 'load a provider module (repeatable)', collect, [])
    .option('--debug', 'print stack traces with errors')
    .exitOverride();
  program.hook('preAction', async (_this, action) => {
    await loadPlugins(globalOptions(action).plugin ?? []);
  });
  for (const command of COMMANDS) command.register(program);
  // Subcommands report usage errors through the same path as the program.
  for (const sub of program.commands) sub.exitOverride();
  return program;
}

export async function main(argv: string[]): Promise<void> {
  const program = buildProgram();
  const debug = argv.includes('--debug');
  try {
    await program.parseAsync(argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      // Help and version end with exit code 0; anything else the parser refused is a usage error.
      process.exitCode = e.exitCode === 0 ? 0 : 2;
      return;
    }
    reportError(e, debug);
  }
}

if (require.main === module) {
  void main(process.argv);
}

export { UsageError };
