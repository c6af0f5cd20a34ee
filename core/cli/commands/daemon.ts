/** `tapkit daemon [--config FILE] [--control PATH] [--metrics HOST:PORT]`: the long-running service. */
import type { Command } from 'commander';
import { runDaemon } from '../../daemon/daemon';
// Contributes the `snapshot` control operation (live VHD snapshots).
import '../../daemon/snapshot';
import '../../nbd/daemon-export'; // registers the nbd export kind
import { DAEMON_READERS } from '../../fuse/daemon-export'; // also registers the fuse export kind
import { SPARE_THREADS } from '../../fuse/export';
import { sizeThreadPool } from '../thread-pool';
import { isLevel, Logger } from '../../daemon/log';
import { UsageError } from '../context';
import '../../ring/export'; // the `xen` export kind

/** Threads for the libuv pool: FUSE mounts keep reads of /dev/fuse waiting on it (core/fuse/export.ts). */
const DAEMON_THREADPOOL = 128;

export function register(program: Command): void {
  // Many mounts by default; an inherited pool too small for one mount is raised (thread-pool.ts).
  program.hook('preSubcommand', (_program, sub) => {
    if (sub.name() === 'daemon') sizeThreadPool({ minimum: DAEMON_READERS + SPARE_THREADS, preferred: DAEMON_THREADPOOL });
  });
  program
    .command('daemon')
    .description('host many devices and their exports in one process, managed with `tapkit ctl`')
    .option('--config <file>', 'JSON configuration: devices to start, limits (SIGHUP reloads it)')
    .option('--control <path>', 'control socket (default /run/tapkit/control.sock)')
    .option('--metrics <host:port>', 'serve Prometheus metrics on this loopback address')
    .option('--log-level <level>', 'debug, info, warn or error', 'info')
    .action(async (options: { config?: string; control?: string; metrics?: string; logLevel: string }) => {
      if (!isLevel(options.logLevel)) throw new UsageError(`--log-level must be debug, info, warn or error (got '${options.logLevel}')`);
      await runDaemon({
        configFile: options.config,
        control: options.control,
        metrics: options.metrics,
        log: new Logger(process.stderr, options.logLevel),
      });
    });
}
