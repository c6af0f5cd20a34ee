/**
 * The `sim` platform (XENSIM.md, version 1): XenStore on `D/xenstored.sock`, event
 * channels on `D/evtchn.sock`, guest memory and grant tables as files in `D/dom<N>/`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { GrantMapper, Platform } from '../platform';
import { EventHub } from './evtchn-hub';
import { SimGrantMapper } from './grants';
import { CopyingGrantMapper } from '../grant-copy';
import { LocalXenStore } from './local-store';
import { Store } from './store';
import { XenStoreDaemon } from './xenstored';

export const SIM_VERSION = 1;

export class SimPlatform implements Platform {
  readonly name = 'sim';
  readonly tree = new Store();
  readonly store = new LocalXenStore(this.tree);
  readonly events: EventHub;
  private readonly daemon: XenStoreDaemon;

  /** `copy`: request data moves by (simulated) grant copy instead of mapping. */
  grantAccess: 'map' | 'copy' = 'map';

  private constructor(readonly dir: string) {
    this.daemon = new XenStoreDaemon(this.tree, path.join(dir, 'xenstored.sock'));
    this.events = new EventHub(path.join(dir, 'evtchn.sock'));
  }

  /** Creates the sockets in `dir` (made if missing) and starts serving them. */
  static async start(dir: string): Promise<SimPlatform> {
    fs.mkdirSync(dir, { recursive: true });
    const platform = new SimPlatform(path.resolve(dir));
    await platform.daemon.listen();
    await platform.events.listen();
    return platform;
  }

  grantsFor(domid: number, options: { persistent: boolean }): GrantMapper {
    const mapper = new SimGrantMapper(this.dir, domid, options.persistent);
    if (this.grantAccess === 'copy') {
      // A refused grant throws GrantError, as a refused status would.
      return new CopyingGrantMapper(mapper, { copy: (d, pieces) => mapper.copy(d, pieces) }, domid);
    }
    return mapper;
  }

  async close(): Promise<void> {
    await this.daemon.close();
    await this.events.close();
    fs.rmSync(path.join(this.dir, 'xenstored.sock'), { force: true });
    fs.rmSync(path.join(this.dir, 'evtchn.sock'), { force: true });
  }
}
