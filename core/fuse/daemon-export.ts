/**
 * The daemon's `fuse:` export kind: `fuse:MOUNTPOINT[,loop][,name=FILE][,allow-other]`.
 *
 *   tapkit ctl create vhd:/srv/vm1.vhd --export fuse:/run/tapkit/mnt/vm1,loop
 *
 * mounts the device as MOUNTPOINT/disk (MOUNTPOINT must exist) and, with `loop`, attaches
 * the file to a free loop device, reported as the export's `device` in `tapkit ctl list`.
 * Destroying the device detaches the loop device, flushes and unmounts, as `tapkit
 * unmount` does; a mount still in use is aborted rather than left waiting on us.
 * A mount point containing a comma cannot be named here.
 */
import { BlockError } from '../errors';
import { registerExportKind, type ExportHandle } from '../daemon/exports';
import { ServedMount } from './served';

export interface FuseExportArgument {
  mountpoint: string;
  loop: boolean;
  name?: string;
  allowOther: boolean;
}

/** Outstanding /dev/fuse reads per daemon mount: fewer than `tapkit mount`'s, so many mounts share the pool. */
export const DAEMON_READERS = 4;

export function parseFuseArgument(argument: string): FuseExportArgument {
  const [mountpoint, ...options] = argument.split(',');
  const usage = 'fuse:MOUNTPOINT[,loop][,name=FILE][,allow-other]';
  if (!mountpoint) throw new BlockError('EINVAL', `the fuse export needs a mount point (${usage})`);
  const parsed: FuseExportArgument = { mountpoint, loop: false, allowOther: false };
  for (const option of options) {
    if (option === 'loop') parsed.loop = true;
    else if (option === 'allow-other') parsed.allowOther = true;
    else if (option.startsWith('name=') && option.length > 5) parsed.name = option.slice(5);
    else throw new BlockError('EINVAL', `unknown fuse export option '${option}' (${usage})`);
  }
  return parsed;
}

registerExportKind('fuse', async (vbd, argument, context): Promise<ExportHandle> => {
  const parsed = parseFuseArgument(argument);
  const served = await ServedMount.start(vbd, {
    spec: vbd.name,
    mountpoint: parsed.mountpoint,
    name: parsed.name,
    allowOther: parsed.allowOther,
    loop: parsed.loop,
    readers: DAEMON_READERS,
    daemonDevice: context.deviceId,
    log: (message) => context.log.warn(message, { export: 'fuse' }),
  });
  // Unmounted from outside (umount, tapkit unmount after a crash): say so once.
  let closing = false;
  let mounted = true;
  void served.ended.then(() => {
    mounted = false;
    if (!closing) context.log.warn('the FUSE mount went away', { export: 'fuse', mountpoint: served.mountpoint });
  });
  return {
    kind: 'fuse',
    target: served.file,
    ...(served.loop ? { device: served.loop } : {}),
    stats: () => ({ mountpoint: served.mountpoint, file: served.file, mounted, ...(served.loop ? { loop: served.loop, directIo: served.state.directIo } : {}) }),
    async close() {
      closing = true;
      const clean = await served.stop();
      await served.ended;
      if (!clean) throw new BlockError('EBUSY', `${served.mountpoint} was still in use: its FUSE connection was aborted (clean up with tapkit unmount ${served.mountpoint})`);
    },
  };
});
