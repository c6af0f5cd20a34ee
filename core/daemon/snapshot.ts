/**
 * The daemon's `snapshot` operation, tap-ctl's live snapshot in one step: pause the
 * device (in-flight requests drain, new ones wait), make a differencing child of its VHD
 * (`snapshotOpenVhd` flushes the open image first, so the parent is complete on disk),
 * reopen the device on the child, unpause. The guest never sees an error; the old top
 * becomes the read-only parent. Any failure leaves the device running on its old chain
 * and no child behind.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockError } from '../errors';
import type { Provider } from '../provider';
import { isUrl } from '../resolve';
import { VhdProvider } from '../../providers/vhd/provider';
import { snapshotOpenVhd } from '../../providers/vhd/snapshot';
import { field } from './control';
import { registerControlOp } from './daemon';
import type { Device, DeviceTable } from './devices';

/** The VHD image a device writes to: the first format below its filters. */
function writableVhdOf(device: Device): VhdProvider {
  for (let p: Provider | undefined = device.vbd.top; p; p = p.lower) {
    if (p instanceof VhdProvider) {
      if (device.vbd.info().readOnly) throw new BlockError('EROFS', `device ${device.id} is read-only: a snapshot has nothing to protect`);
      if (!p.location || isUrl(p.location)) throw new BlockError('EINVAL', `device ${device.id}'s VHD is not a local file, so no child can be made beside it`);
      return p;
    }
    if (p.backing) break;
  }
  throw new BlockError('EINVAL', `device ${device.id} is not served from a VHD (spec '${device.request.spec}'): snapshot needs one`);
}

/** The directories of every local file in a chain (its layers and their backing chains). */
function chainDirectories(top: Provider): string[] {
  const dirs = new Set<string>();
  const visit = (p: Provider | undefined): void => {
    for (; p; p = p.lower) {
      if (p.location && !isUrl(p.location)) dirs.add(path.dirname(p.location));
      visit(p.backing);
    }
  };
  visit(top);
  return [...dirs];
}

export async function snapshotDevice(devices: DeviceTable, id: string, childPath: string): Promise<Device> {
  const device = devices.get(id);
  const parent = writableVhdOf(device);
  const child = path.resolve(childPath);
  if (fs.existsSync(child)) throw new BlockError('EEXIST', `${child} exists already: a snapshot never overwrites a file`);
  const wasPaused = device.vbd.isPaused;
  if (!wasPaused) await devices.pause(device.id);
  try {
    // Paused and idle: the provider is ours alone until unpause.
    await snapshotOpenVhd(parent, child);
    try {
      // The child names its parent: the chain may reach every directory it reached before.
      await devices.unpause(device.id, `vhd:${child}`, chainDirectories(device.vbd.top));
    } catch (e) {
      fs.rmSync(child, { force: true });
      throw e;
    }
  } finally {
    if (device.vbd.isPaused && !wasPaused) device.vbd.resume();
  }
  return device;
}

registerControlOp('snapshot', async (daemon, request) => {
  const device = await snapshotDevice(daemon.devices, field(request, 'device', 'string'), field(request, 'path', 'string'));
  return device.summary();
});
