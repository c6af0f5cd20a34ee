/**
 * `tapkit mount SPEC MOUNTPOINT [--read-only] [--name disk] [--loop] [--allow-other]`:
 * serves a disk as one file on a FUSE mount (and, with --loop, as a loop block device)
 * in the foreground until it is unmounted or signalled.
 *
 * `tapkit unmount MOUNTPOINT`: detaches the loop devices backed by the file, asks the
 * server to flush the VBD, unmounts, in that order. When the server is gone (killed,
 * crashed) it aborts the stale FUSE connection first, then cleans up the same way.
 * The two find each other through core/fuse/control.ts (a state file and a control
 * socket in /run/tapkit/fuse, keyed by the mount point).
 */
import * as fs from 'node:fs';
import type { Command } from 'commander';
import { BlockError } from '../../errors';
import { Vbd } from '../../vbd';
import { DEFAULT_READERS, FUSE_FSTYPE } from '../../fuse/export';
import { readState, removeState, sendControl, type MountState } from '../../fuse/control';
import { detachLoop, loopsBackedBy } from '../../fuse/loop';
import { ServedMount } from '../../fuse/served';
import { abortConnection, connectionOf, findMount, resolveMountpoint } from '../../fuse/mounts';
import { MOUNT_EBUSY, umount2 } from '../../../native/mount';
import type { NativeError } from '../../../native/libc';
import { sizeThreadPool } from '../thread-pool';
import { addOpenOptions, describeError, openerFor, UsageError, type OpenCliOptions } from '../context';

interface MountCliOptions extends OpenCliOptions {
  name: string;
  loop?: boolean;
  allowOther?: boolean;
}

export function register(program: Command): void {
  // Each outstanding /dev/fuse read holds a thread-pool thread; leave room for the
  // provider's own file I/O. An inherited smaller pool is raised (thread-pool.ts).
  program.hook('preSubcommand', (_program, sub) => {
    if (sub.name() !== 'mount') return;
    const needed = DEFAULT_READERS + 8;
    sizeThreadPool({ minimum: needed, preferred: needed });
  });
  addOpenOptions(
    program
      .command('mount')
      .argument('<spec>', 'the disk: memory:1G, /path/image.vhd, ...')
      .argument('<mountpoint>', 'an existing directory to mount the file on')
      .description('serve a disk as one file on a FUSE mount (and a loop device with --loop) until unmounted'),
  )
    .option('--read-only', 'refuse writes')
    .option('--name <file>', 'name of the file in the mount', 'disk')
    .option('--loop', 'attach the file to a free loop device and print its path')
    .option('--allow-other', 'let other users open the file (mount option allow_other)')
    .action(serve);

  program
    .command('unmount')
    .argument('<mountpoint>', 'where `tapkit mount` mounted the disk')
    .description('detach loop devices, flush the disk, unmount (also cleans up after a dead server)')
    .action(unmount);
}

async function serve(spec: string, mountpointArg: string, options: MountCliOptions): Promise<void> {
  const log = (m: string) => process.stderr.write(`tapkit: ${m}\n`);
  const mountpoint = resolveMountpoint(mountpointArg);
  if (findMount(mountpoint)?.fstype === FUSE_FSTYPE) throw new UsageError(`${mountpoint} is already a tapkit mount (tapkit unmount ${mountpoint})`);
  if (!fs.existsSync(mountpoint)) throw new UsageError(`mount point ${mountpointArg} does not exist`);

  const vbd = new Vbd(await openerFor(options).open(spec), { name: spec, readOnly: !!options.readOnly });
  let served: ServedMount;
  try {
    served = await ServedMount.start(vbd, { spec, mountpoint, name: options.name, readOnly: !!options.readOnly, allowOther: !!options.allowOther, loop: !!options.loop, log: (m) => log(`fuse: ${m}`) });
  } catch (e) {
    await vbd.close().catch(() => {});
    throw e;
  }

  // Whatever goes wrong from here on, users of the file get errors, never a hang.
  const die = (e: unknown) => {
    log(`fatal: ${describeError(e)}; aborting the FUSE connection of ${mountpoint}`);
    try {
      served.abort();
    } catch (abortError) {
      log(describeError(abortError));
    }
    process.exit(1);
  };
  process.on('uncaughtException', die);
  process.on('unhandledRejection', die);
  const shutdown = (why: string) => {
    log(`${why}: unmounting ${mountpoint}`);
    void served.stop().then((clean) => {
      if (!clean) process.exitCode = 1;
    });
  };
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(signal, () => shutdown(signal));

  process.stdout.write(`${served.file}\n`);
  if (served.loop) process.stdout.write(`${served.loop}\n`);

  await served.ended;
  await vbd.close().catch((e) => {
    log(`closing the disk failed: ${describeError(e)}`);
    process.exitCode = 1;
  });
  process.off('uncaughtException', die);
  process.off('unhandledRejection', die);
}

async function unmount(mountpointArg: string): Promise<void> {
  const log = (m: string) => process.stderr.write(`tapkit: ${m}\n`);
  const mountpoint = resolveMountpoint(mountpointArg);
  const entry = findMount(mountpoint);
  if (!entry || entry.fstype !== FUSE_FSTYPE) {
    const leftover = readState(mountpoint);
    if (leftover && !alive(leftover.pid)) removeState(mountpoint);
    throw new UsageError(`${mountpoint} is not a tapkit FUSE mount`);
  }

  let server: MountState | undefined;
  try {
    server = JSON.parse(await sendControl(mountpoint, 'status', 5_000)) as MountState;
  } catch (e) {
    if (!(e instanceof BlockError) || (e.code !== 'ESHUTDOWN' && e.code !== 'ETIMEDOUT')) throw e;
    // Stale: abort first, so detaching the loop device and unmounting do not wait on it.
    log(`${describeError(e)}; aborting the FUSE connection`);
    abortConnection(connectionOf(entry));
  }
  if (server?.daemonDevice !== undefined) {
    throw new UsageError(`${mountpoint} is served by tapkit daemon (pid ${server.pid}) as device ${server.daemonDevice}: end it with tapkit ctl destroy ${server.daemonDevice}`);
  }

  const prefix = `${mountpoint}/`;
  for (const { device, file } of loopsBackedBy({ under: prefix })) {
    await detachLoop(device, file);
  }
  if (server) await sendControl(mountpoint, 'flush', 300_000);
  try {
    umount2(mountpoint, 0);
  } catch (e) {
    if ((e as NativeError).errnoNumber === MOUNT_EBUSY) throw new BlockError('EBUSY', `${mountpoint} is still in use (see: fuser -vm ${mountpoint})`);
    throw e;
  }
  if (server) await waitForExit(server.pid, 10_000);
  else removeState(mountpoint);
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function waitForExit(pid: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (alive(pid) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
}
