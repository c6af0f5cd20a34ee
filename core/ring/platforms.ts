/**
 * `--platform` for the blkif backend: `sim:DIR` (XENSIM.md) or `xen` (a real Linux dom0
 * through libxenstore, libxenevtchn and libxengnttab).
 */
import type { Platform } from './platform';
import { SimPlatform } from './sim/platform';
import { XenPlatform } from './xen/platform';

export async function openPlatform(spec: string): Promise<Platform & { describe: string }> {
  if (spec === 'xen') {
    const platform = new XenPlatform();
    return Object.assign(platform, { describe: 'xen (this dom0)' });
  }
  const m = /^sim:(.+)$/.exec(spec);
  if (!m) throw new Error(`unknown platform '${spec}' (expected xen or sim:DIR)`);
  const platform = await SimPlatform.start(m[1]);
  return Object.assign(platform, { describe: `sim:${platform.dir}` });
}
