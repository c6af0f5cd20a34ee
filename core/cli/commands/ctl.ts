/** `tapkit ctl VERB ...`: talks to a running daemon, with tap-ctl's verbs. */
import type { Command } from 'commander';
import { BlockError, type ErrnoName } from '../../errors';
import { DEFAULT_CONTROL } from '../../daemon/daemon';
import { controlRequest, type ControlRequest } from '../../daemon/protocol';
import type { DeviceStats, DeviceSummary } from '../../daemon/devices';
import { formatSize } from '../../size';
import { collect } from '../context';

async function call(command: Command, request: ControlRequest): Promise<unknown> {
  const control = (command.optsWithGlobals() as { control?: string }).control ?? DEFAULT_CONTROL;
  const response = await controlRequest(control, request);
  if (!response.ok) throw new BlockError(response.error.code as ErrnoName, response.error.message);
  return response.result;
}

const print = (value: unknown) => process.stdout.write(`${typeof value === 'string' ? value : JSON.stringify(value, null, 2)}\n`);

function summaryLine(d: DeviceSummary): string {
  const exports = d.exports.map((e) => `${e.kind}:${e.target}${e.device ? ` (${e.device})` : ''}`).join(' ') || '-';
  return `${d.id.padEnd(4)} ${d.state.padEnd(8)} ${formatSize(d.size).padEnd(10)} ${d.spec}  exports: ${exports}  ops: ${d.counters.operations} errors: ${d.counters.errors}`;
}

export function register(program: Command): void {
  const ctl = program
    .command('ctl')
    .description('manage the devices of a running `tapkit daemon`')
    .option('--control <path>', 'the daemon\'s control socket', DEFAULT_CONTROL);

  ctl
    .command('create')
    .argument('<spec>', 'the disk')
    .option('--export <kind:arg>', 'an export: nbd:SOCKET|HOST:PORT, fuse:MOUNTPOINT, xen:... (repeatable)', collect, [])
    .option('--filter <name>', 'a filter on top (repeatable)', collect, [])
    .option('--read-only', 'serve read-only')
    .option('--name <name>', 'a name for the device')
    .description('open a device and start its exports; prints its id')
    .action(async (spec: string, o: { export: string[]; filter: string[]; readOnly?: boolean; name?: string }, command: Command) => {
      const result = (await call(command, { op: 'create', spec, exports: o.export, filters: o.filter, readOnly: !!o.readOnly, name: o.name })) as DeviceSummary;
      print(result.id);
    });

  ctl
    .command('list')
    .option('--json', 'print JSON')
    .description('list devices: id, state, size, spec, exports, counters')
    .action(async (o: { json?: boolean }, command: Command) => {
      const devices = (await call(command, { op: 'list' })) as DeviceSummary[];
      if (o.json) print(devices);
      else for (const d of devices) print(summaryLine(d));
    });

  ctl
    .command('pause')
    .argument('<id>')
    .description('drain in-flight requests, then hold new ones')
    .action(async (id: string, _o: unknown, command: Command) => void (await call(command, { op: 'pause', device: id })));

  ctl
    .command('unpause')
    .argument('<id>')
    .option('--spec <spec>', 'reopen the device on a new chain first (a live snapshot)')
    .description('release held requests')
    .action(async (id: string, o: { spec?: string }, command: Command) => void (await call(command, { op: 'unpause', device: id, spec: o.spec })));

  ctl
    .command('destroy')
    .argument('<id>')
    .description('stop the exports, flush and close the device')
    .action(async (id: string, _o: unknown, command: Command) => void (await call(command, { op: 'destroy', device: id })));

  ctl
    .command('stats')
    .argument('<id>')
    .option('--json', 'print JSON')
    .description('operations, bytes, errors, latency percentiles, queue depth, per export')
    .action(async (id: string, o: { json?: boolean }, command: Command) => {
      const stats = (await call(command, { op: 'stats', device: id })) as DeviceStats;
      if (o.json) {
        print(stats);
        return;
      }
      print(`device ${stats.id}: in flight ${stats.inFlight}, queued ${stats.queued}${stats.paused ? ', paused' : ''}`);
      for (const [op, s] of Object.entries(stats.operations)) {
        if (s.count === 0) continue;
        print(`  ${op.padEnd(8)} ${String(s.count).padStart(10)} ops  ${formatSize(s.bytes).padStart(10)}  ${s.errors} errors  p50 ${s.latency.p50} µs  p99 ${s.latency.p99} µs`);
      }
      for (const e of stats.exports) print(`  export ${e.kind}:${e.target}${e.stats ? ` ${JSON.stringify(e.stats)}` : ''}`);
    });

  ctl
    .command('snapshot')
    .argument('<id>')
    .argument('<path>', 'the new VHD child to create')
    .description('pause, create a differencing child, reopen on it, unpause: a live snapshot')
    .action(async (id: string, path: string, _o: unknown, command: Command) => {
      print(await call(command, { op: 'snapshot', device: id, path }));
    });

  ctl
    .command('reload')
    .description('reread the daemon\'s config file (as SIGHUP does)')
    .action(async (_o: unknown, command: Command) => void (await call(command, { op: 'reload' })));
}
