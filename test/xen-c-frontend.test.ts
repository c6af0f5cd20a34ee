/**
 * The blkif backend on the sim platform, driven by a C frontend built against Xen's
 * headers (io/ring.h macros, io/blkif.h structures) and libxenstore: the handshake, data
 * checked against the provider, flush and barrier, discard, indirect requests, a
 * multi-page ring wrapped many times, two queues, refused grants, a ring overrun,
 * reconnect, a read-only vbd; both guest ABIs.
 */
import test from 'ava';
import { firstMismatch, readProvider, runFrontend, SimBackend } from './xen/harness';

const DOMID = 5;
const DEVID = 51712;
const SPEC = 'memory:64M';

async function withDevice(t: any, args: string[], check?: (sim: SimBackend) => Promise<void>, readOnly = false): Promise<string> {
  const sim = await SimBackend.start();
  t.teardown(() => sim.close());
  await sim.attach(DOMID, DEVID, SPEC, readOnly);
  await sim.waitForDevice(DOMID, DEVID);
  const result = await runFrontend(sim.dir, DOMID, DEVID, args);
  t.is(result.code, 0, `frontend ${args.join(' ')}: ${result.stdout}${result.stderr}\nbackend log:\n${sim.log.join('\n')}`);
  if (check) await check(sim);
  return result.stdout;
}

/** The provider holds the pattern at `sector` for `pages` pages. */
async function holdsPattern(t: any, sim: SimBackend, sector: number, pages: number, seed: number): Promise<void> {
  const data = await readProvider(sim.providers.get(SPEC)!, sector * 512, pages * 4096);
  t.is(firstMismatch(data, sector * 512, seed), -1, `pattern at sector ${sector}`);
}

for (const abi of ['64', '32']) {
  test.serial(`x86_${abi}-abi: handshake, writes and reads, checked against the provider`, async (t) => {
    const out = await withDevice(t, ['rw', '--abi', abi, '--seed', '7'], async (sim) => {
      await holdsPattern(t, sim, 0, 64, 7);
      await holdsPattern(t, sim, 2048, 11, 7);
      const sub = await readProvider(sim.providers.get(SPEC)!, 4096 * 512, 2048);
      t.is(firstMismatch(sub, 4096 * 512, 7), -1);
    });
    t.regex(out, new RegExp(`ok rw x86_${abi}-abi`));
  });

  test.serial(`x86_${abi}-abi: indirect requests of 256 segments`, async (t) => {
    const out = await withDevice(t, ['indirect', '--abi', abi, '--seed', '3'], (sim) => holdsPattern(t, sim, 32768, 256, 3));
    t.regex(out, /ok indirect 256 segments/);
  });

  test.serial(`x86_${abi}-abi: a 16-page ring wrapped many times`, async (t) => {
    const out = await withDevice(t, ['wrap', '--abi', abi, '--order', '4', '--count', '6000']);
    t.regex(out, /ok wrap 6000 requests over 512 slots/);
  });
}

test.serial('flush, flush with data and write barriers', async (t) => {
  const out = await withDevice(t, ['flush', '--seed', '11'], async (sim) => {
    await holdsPattern(t, sim, 8192, 8, 11);
    await holdsPattern(t, sim, 8192 + 64, 2, 11);
  });
  t.regex(out, /ok flush/);
});

test.serial('discard, secure discard (not offered) and a discard past the end', async (t) => {
  const out = await withDevice(t, ['discard']);
  t.regex(out, /ok discard/);
});

test.serial('two queues, each with its ring and event channel, x86_32-abi with persistent grants', async (t) => {
  const out = await withDevice(t, ['queues', '--queues', '2', '--abi', '32', '--persistent', '--seed', '5'], async (sim) => {
    await holdsPattern(t, sim, 65536, 22, 5);
    await holdsPattern(t, sim, 65536 + 1024, 22, 6);
  });
  t.regex(out, /ok queues 2/);
});

test.serial('grants not given to domain 0, given to another domain, read-only for a READ, or out of range are refused; later requests succeed', async (t) => {
  const out = await withDevice(t, ['hostile', '--seed', '9'], (sim) => holdsPattern(t, sim, 0, 4, 9));
  t.regex(out, /ok hostile/);
});

test.serial('a ring overrun is answered by disconnect (error node, Closing); the device serves again after Closed', async (t) => {
  const out = await withDevice(t, ['overrun', '--seed', '4'], (sim) => holdsPattern(t, sim, 0, 4, 4));
  t.regex(out, /ok overrun \(ring overrun/);
  t.regex(out, /ok served again after the overrun/);
});

test.serial('close and reconnect (a guest reboot)', async (t) => {
  const out = await withDevice(t, ['reconnect', '--order', '2', '--seed', '2'], (sim) => holdsPattern(t, sim, 0, 8, 2));
  t.regex(out, /ok reconnect/);
});

test.serial('a read-only vbd refuses writes and serves reads', async (t) => {
  const out = await withDevice(t, ['readonly'], undefined, true);
  t.regex(out, /ok readonly/);
});
