/**
 * Ordering on the ring, seen by a provider that logs when each call starts and ends and
 * makes writes to the first page slow: FLUSH_DISKCACHE flushes only after every earlier
 * write has completed; WRITE_BARRIER waits for everything before it, writes, flushes, and
 * holds back everything after it (blkif.h, XENSIM.md settled detail 13).
 */
import test from 'ava';
import { OpenRequest, parseSize, provider, type Capabilities, type DiskInfo, type Provider } from '../core';
import { OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE, OP_WRITE_BARRIER, RSP_OKAY } from '../core/ring/abi';
import { SimBackend } from './xen/harness';
import { TsFrontend } from './xen/ts-frontend';

const events: string[] = [];

@provider({ name: 'xenorder', kind: 'source', description: 'test: a RAM disk that logs its calls; writes to sector 0 take 150 ms' })
export class OrderLoggingProvider implements Provider {
  readonly name = 'xenorder';
  private readonly bytes: Buffer;
  constructor(request: OpenRequest) {
    this.bytes = Buffer.alloc(parseSize(request.arg, 'size', request.spec));
  }
  info(): DiskInfo {
    return { size: this.bytes.length, logicalBlockSize: 512, physicalBlockSize: 4096, readOnly: false };
  }
  capabilities(): Capabilities {
    return { write: true, flush: true, fua: false, trim: false, zero: false, extents: false, multiConn: true, concurrent: true };
  }
  private async logged(what: string, slow: boolean, body: () => void): Promise<void> {
    events.push(`start ${what}`);
    await new Promise((r) => setTimeout(r, slow ? 150 : 5));
    body();
    events.push(`end ${what}`);
  }
  read(buf: Uint8Array, offset: number): Promise<void> {
    return this.logged(`read ${offset / 512}`, false, () => buf.set(this.bytes.subarray(offset, offset + buf.length)));
  }
  write(buf: Uint8Array, offset: number): Promise<void> {
    return this.logged(`write ${offset / 512}`, offset === 0, () => this.bytes.set(buf, offset));
  }
  flush(): Promise<void> {
    return this.logged('flush', false, () => undefined);
  }
  async close(): Promise<void> {}
}

test('a flush follows the writes before it; a barrier drains, writes, flushes, and holds back what follows', async (t) => {
  const sim = await SimBackend.start();
  t.teardown(() => sim.close());
  await sim.attach(5, 51712, 'xenorder:16M');
  await sim.waitForDevice(5, 51712);
  const fe = await TsFrontend.open(sim.dir, 5, 51712);
  t.teardown(() => fe.close());
  await fe.connect();
  events.length = 0;
  const H = 51712 & 0xffff;
  const p = fe.mem.allocPages(4);
  const answers = [
    fe.put({ kind: 'rw', operation: OP_WRITE, handle: H, sector: 0n, segments: [fe.segment(p, true)] }),
    fe.put({ kind: 'rw', operation: OP_FLUSH_DISKCACHE, handle: H, sector: 0n, segments: [] }),
    fe.put({ kind: 'rw', operation: OP_WRITE, handle: H, sector: 64n, segments: [fe.segment(p + 1, true)] }),
    fe.put({ kind: 'rw', operation: OP_WRITE_BARRIER, handle: H, sector: 128n, segments: [fe.segment(p + 2, true)] }),
    fe.put({ kind: 'rw', operation: OP_READ, handle: H, sector: 256n, segments: [fe.segment(p + 3, false)] }),
  ];
  fe.push();
  for (const a of await Promise.all(answers)) t.is(a.status, RSP_OKAY);
  const at = (e: string) => {
    const i = events.indexOf(e);
    if (i < 0) throw new Error(`no '${e}' in ${events.join(', ')}`);
    return i;
  };
  const order = events.join(', ');
  t.log(order);
  t.true(at('end write 0') < at('start flush'), `the flush waited for the earlier write: ${order}`);
  for (const before of ['end write 0', 'end write 64', 'end flush']) t.true(at(before) < at('start write 128'), `the barrier's write after '${before}': ${order}`);
  const barrierFlush = events.indexOf('start flush', at('end write 128'));
  t.true(barrierFlush > at('end write 128'), `the barrier flushes after its write: ${order}`);
  t.true(events.indexOf('end flush', barrierFlush) < at('start read 256'), `the read after the barrier waited for it: ${order}`);
  await fe.disconnect();
});
