/**
 * The NBD server's zero-copy read path with a provider that lends only part of its disk
 * (as the http source lends its readahead window): lent ranges go out as the provider's
 * views and are given back once written, declined ranges are read into the server's own
 * buffers; libnbd's nbdcopy reads the whole disk and gets every byte right.
 */
import test from 'ava';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdServer } from '../core/nbd';
import type { Capabilities, DiskInfo, Provider } from '../core/provider';
import { Vbd } from '../core/vbd';
import { must } from './helpers/run';
import { tempDir } from './helpers/temp';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Lends reads that start in an even 256 KiB block (after a turn of the event loop); declines the rest. */
class HalfLender implements Provider {
  readonly name = 'half-lender';
  readonly data = crypto.randomBytes(8 * MiB);
  readonly lent: Uint8Array[][] = [];
  readonly returned: Array<readonly Uint8Array[]> = [];
  declined = 0;

  info(): DiskInfo {
    return { size: this.data.length, logicalBlockSize: 1, physicalBlockSize: 4096, readOnly: true };
  }

  capabilities(): Capabilities {
    return { write: false, flush: false, fua: false, trim: false, zero: false, extents: false, multiConn: true, concurrent: true };
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    buf.set(this.data.subarray(offset, offset + buf.length));
  }

  async readViews(offset: number, length: number): Promise<Uint8Array[] | undefined> {
    await new Promise((resolve) => setImmediate(resolve));
    if (Math.floor(offset / (256 * KiB)) % 2 === 1) {
      this.declined++;
      return undefined;
    }
    // Two views per lend: the server must send them in order, then give both back.
    const half = Math.floor(length / 2);
    const views = [this.data.subarray(offset, offset + half), this.data.subarray(offset + half, offset + length)];
    this.lent.push(views);
    return views;
  }

  returnViews(views: readonly Uint8Array[]): void {
    this.returned.push(views);
  }

  async close(): Promise<void> {}
}

test('lent views are sent in order and given back once written; declined ranges are read; nbdcopy gets every byte', async (t) => {
  const dir = tempDir(t);
  const provider = new HalfLender();
  const vbd = new Vbd(provider);
  const server = new NbdServer({ exports: [{ name: '', vbd }] });
  const socket = path.join(dir, 'nbd.sock');
  await server.listen({ path: socket });
  t.teardown(() => server.close());
  const out = path.join(dir, 'copy.raw');
  // 256 KiB requests, so that lent and declined ranges alternate.
  await must('nbdcopy', ['--request-size=262144', `nbd+unix:///?socket=${socket}`, out]);
  t.true(fs.readFileSync(out).equals(provider.data), 'the copy equals the disk');
  t.true(provider.lent.length > 0 && provider.declined > 0, `lent ${provider.lent.length}, declined ${provider.declined}`);
  // Write callbacks run on the server's next turns: wait for them (bounded).
  for (let i = 0; i < 100 && provider.returned.length < provider.lent.length; i++) await new Promise((r) => setTimeout(r, 20));
  t.is(provider.returned.length, provider.lent.length, 'every lend given back');
  t.is(new Set(provider.returned).size, provider.returned.length, 'each lend given back once');
  t.true(provider.returned.every((views) => provider.lent.includes(views as Uint8Array[])), 'only lent views come back');
});
