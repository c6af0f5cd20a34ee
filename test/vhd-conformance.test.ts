/**
 * The provider conformance suite over VHD images of every type, on a file (raw) and in
 * memory. Images come from qemu-img or from tapkit's own create/snapshot; each test gets
 * a fresh copy.
 *
 * In memory the container cannot grow, so the images put there have every block
 * allocated already (a new block would be refused with ENOSPC); the differencing image in
 * memory finds its parent on a file through the absolute (W2ku) locator.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import '../providers';
import { BlockError } from '../core/errors';
import { Opener } from '../core/open';
import { OpenRequest } from '../core/open-request';
import type { Provider } from '../core/provider';
import { createImage } from '../providers/vhd/create';
import { VhdProvider } from '../providers/vhd/provider';
import { snapshotVhd } from '../providers/vhd/snapshot';
import { runConformance } from './conformance';
import { must } from './helpers/run';
import { fileTempDir } from './helpers/temp';

const dir = fileTempDir('tapkit-vhd-conformance-');
const MiB = 2 ** 20;
let copies = 0;

async function qemuImg(args: string[]): Promise<void> {
  await must('qemu-img', args);
}

async function qemuIo(image: string, commands: string[]): Promise<void> {
  await must('qemu-io', ['-f', 'vpc', ...commands.flatMap((c) => ['-c', c]), image]);
}

/** Originals, made once; each test opens a copy. */
const originals = {
  fixed: path.join(dir, 'fixed.vhd'),
  dynamic: path.join(dir, 'dynamic.vhd'),
  qemuDynamic: path.join(dir, 'qemu-dynamic.vhd'),
  parent: path.join(dir, 'parent.vhd'),
  child: path.join(dir, 'child.vhd'),
  fullDynamic: path.join(dir, 'full-dynamic.vhd'),
  fullChild: path.join(dir, 'full-child.vhd'),
};

test.before(async () => {
  createImage(originals.fixed, { size: 8 * MiB, type: 'fixed' });
  createImage(originals.dynamic, { size: 12 * MiB + 512, type: 'dynamic', blockSize: 512 * 1024 });
  await qemuImg(['create', '-q', '-f', 'vpc', originals.qemuDynamic, '10M']);
  await qemuIo(originals.qemuDynamic, ['write -P 0x17 0 300k', 'write -P 0x18 5M 2M']);
  // A parent with data, and a child over it (absolute locator W2ku names the parent).
  await qemuImg(['create', '-q', '-f', 'vpc', originals.parent, '8M']);
  await qemuIo(originals.parent, ['write -P 0x21 0 8M']);
  await makeChild(originals.parent, originals.child, false);
  // Every block allocated: a raw file with no zero block, converted by qemu-img at its exact size.
  const raw = path.join(dir, 'full.raw');
  fs.writeFileSync(raw, Buffer.alloc(6 * MiB, 0x33));
  await qemuImg(['convert', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=dynamic,force_size=on', raw, originals.fullDynamic]);
  // A child whose every block holds one written sector (the rest still comes from the parent).
  await makeChild(originals.parent, originals.fullChild, true);
});

async function makeChild(parent: string, child: string, touchEveryBlock: boolean): Promise<void> {
  await snapshotVhd(parent, child, { blockSize: MiB });
  if (!touchEveryBlock) return;
  const p = await new Opener({ readOnly: false }).open(`vhd:${child}`);
  for (let at = 0; at < p.info().size; at += MiB) await p.write!(Buffer.alloc(512, 0x44), at + 4096, {});
  await p.close();
}

function copyOf(original: string): string {
  const file = path.join(dir, `copy-${copies++}-${path.basename(original)}`);
  fs.copyFileSync(original, file);
  return file;
}

/** The image's bytes in a memory disk, with the VHD provider on top. */
async function inMemory(original: string, readOnly: boolean): Promise<Provider> {
  const bytes = fs.readFileSync(original);
  const memory = await new Opener({ readOnly: false }).open(`memory:${bytes.length}`);
  await memory.write!(bytes, 0, {});
  const request = new OpenRequest(`vhd:memory:${bytes.length}`, `memory:${bytes.length}`, {}, memory, readOnly, (name, options) => {
    // No location to resolve against: only an absolute name (W2ku) can be found.
    if (!path.isAbsolute(name)) return Promise.reject(new BlockError('ENOENT', `'${name}' is relative and a memory disk has no directory`));
    return new Opener({ readOnly: true }).open(`${options?.format ?? 'vhd'}:${name}`);
  }, () => {});
  const vhd = new VhdProvider(request);
  await vhd.open();
  return vhd;
}

const onFile = (original: string) => ({ readOnly }: { readOnly: boolean }) => (readOnly ? `vhd:${original}` : `vhd:${copyOf(original)}`);

runConformance(test, { name: 'vhd fixed on raw', open: onFile(originals.fixed) });
runConformance(test, { name: 'vhd dynamic on raw', open: onFile(originals.dynamic) });
runConformance(test, { name: 'vhd dynamic (qemu-img made) on raw', open: onFile(originals.qemuDynamic) });
// A child keeps trimmed sectors: freeing them would bring the parent's data back.
runConformance(test, { name: 'vhd differencing on raw', open: onFile(originals.child), trimReadsZeros: false });
runConformance(test, { name: 'vhd fixed on memory', open: ({ readOnly }) => inMemory(originals.fixed, readOnly) });
runConformance(test, { name: 'vhd dynamic (all blocks allocated) on memory', open: ({ readOnly }) => inMemory(originals.fullDynamic, readOnly) });
runConformance(test, { name: 'vhd differencing (all blocks allocated) on memory', open: ({ readOnly }) => inMemory(originals.fullChild, readOnly), trimReadsZeros: false });

test('a dynamic VHD in memory refuses a write that needs a new block with ENOSPC, and stays readable', async (t) => {
  const p = await inMemory(originals.qemuDynamic, false);
  t.teardown(() => p.close());
  const err = await t.throwsAsync(p.write!(Buffer.alloc(4096, 1), 9 * MiB, {}));
  t.is((err as { code?: string }).code, 'ENOSPC');
  t.regex(err!.message, /cannot grow/);
  const buf = Buffer.alloc(512);
  await p.read(buf, 5 * MiB);
  t.true(buf.every((b) => b === 0x18));
  // Writes into allocated blocks still work.
  await p.write!(Buffer.alloc(512, 0x5e), 5 * MiB, {});
  await p.read(buf, 5 * MiB);
  t.true(buf.every((b) => b === 0x5e));
});
