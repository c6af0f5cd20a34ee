/**
 * Inspection without trust (`tapkit info --inspect`, `tapkit check`): the chain an
 * untrusted image names is reported with each name resolved or refused and why, and
 * refused names are never touched (a FIFO outside the tree would hang any open);
 * structural checks find damage that qemu-img check also finds, and pass what it passes.
 */
import test from 'ava';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import '../providers';
import { Inspector } from '../core/inspect';
import { plantVhdParent, qcow2Naming, vhdChild, vpcImage } from './helpers/hostile';
import { startNginx } from './helpers/nginx';
import { headerFields, qemuImg, qemuIo, readU64, writeU64 } from './helpers/qemu-images';
import { run, tapkit } from './helpers/run';

const roots: string[] = [];
test.after.always(() => {
  for (const r of roots) fs.rmSync(r, { recursive: true, force: true });
});

function tempRoot(): { root: string; vm: string; outside: string } {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-inspect-'));
  roots.push(root);
  const vm = path.join(root, 'images', 'vm');
  const outside = path.join(root, 'outside');
  fs.mkdirSync(vm, { recursive: true });
  fs.mkdirSync(outside);
  return { root, vm, outside };
}

/** qemu-img check's verdict: 0 clean, 2 corruptions, 3 leaks only (refcounts), others errors. */
async function qemuCheck(image: string, format = 'qcow2'): Promise<number> {
  return (await run('qemu-img', ['check', '-f', format, image])).code ?? -1;
}

test('info --inspect names the chain and refuses hostile names without touching them', async (t) => {
  const { vm, outside } = tempRoot();
  // A FIFO outside the tree: opening it for reading would block until a writer comes.
  const fifo = path.join(outside, 'trap');
  execFileSync('mkfifo', [fifo], { timeout: 10_000 });
  await qcow2Naming(path.join(vm, 'middle.qcow2'), fifo);
  const top = await qcow2Naming(path.join(vm, 'top.qcow2'), 'middle.qcow2', { format: 'qcow2' });
  const { code, stdout, stderr } = await tapkit(['info', '--inspect', '--json', top], { timeoutMs: 30_000 });
  t.is(code, 0, stderr);
  const report = JSON.parse(stdout);
  t.false(report.wouldOpen);
  t.is(report.images.length, 2);
  t.like(report.images[0], { level: 0, format: 'qcow2', probed: true, location: top });
  t.like(report.images[0].references[0], { role: 'backing', name: 'middle.qcow2', format: 'qcow2', resolved: path.join(vm, 'middle.qcow2') });
  t.like(report.images[1], { level: 1, format: 'qcow2', location: path.join(vm, 'middle.qcow2') });
  const refused = report.images[1].references[0];
  t.like(refused, { role: 'backing', name: fifo, format: 'raw' });
  t.is(refused.resolved, undefined);
  t.regex(refused.refused, /backing policy \(outside the image's directory tree/);
  // The text form says the same.
  const text = await tapkit(['info', '--inspect', top], { timeoutMs: 30_000 });
  t.regex(text.stdout, /backing 'middle\.qcow2' as qcow2: -> .*middle\.qcow2\n/);
  t.regex(text.stdout, /refused: backing policy/);
  t.regex(text.stdout, /would open: no\n$/);
  // Plain info refuses too, naming the rule, and does not hang on the FIFO either.
  const opened = await tapkit(['info', top], { timeoutMs: 30_000 });
  t.is(opened.code, 1);
  t.regex(opened.stderr, /backing policy \(outside the image's directory tree.*\[EACCES\]/);
  // With --json it also prints what the chain would have been.
  const json = await tapkit(['info', '--json', top], { timeoutMs: 30_000 });
  t.is(json.code, 1);
  const refusedReport = JSON.parse(json.stdout);
  t.false(refusedReport.opened);
  t.regex(refusedReport.error, /backing policy/);
  t.is(refusedReport.images[1].references[0].name, fifo);
});

test('inspection reports each VHD parent candidate with its verdict, and what the flags change', async (t) => {
  const { vm, outside } = tempRoot();
  const base = await vpcImage(path.join(outside, 'base.vhd'));
  const child = vhdChild(path.join(vm, 'child.vhd'), base);
  plantVhdParent(child, '../../outside/base.vhd');
  const refused = await new Inspector({ warn: () => {} }).inspect(`vhd:${child}`);
  t.false(refused.wouldOpen);
  const sources = refused.images[0].references.map((r) => r.source);
  // The locators all name the same path (listed once); the parent name's basename is the fallback.
  t.deepEqual(sources, ['W2ru', 'parent name']);
  t.regex(refused.images[0].references[0].refused ?? '', /backing policy \(outside the image's directory tree/);
  // The basename fallback resolves inside the tree, where there is no such file.
  t.like(refused.images[0].references[1], { name: 'base.vhd', resolved: path.join(vm, 'base.vhd'), missing: true });

  const allowed = await new Inspector({ backing: { allow: [outside] } }).inspect(`vhd:${child}`);
  t.true(allowed.wouldOpen);
  t.like(allowed.images[0].references[0], { source: 'W2ru', resolved: path.join(outside, 'base.vhd'), chosen: true });
  t.is(allowed.images[1].location, path.join(outside, 'base.vhd'));
  t.is(allowed.images[1].format, 'vhd');

  const explicit = await new Inspector({ backing: { explicit: [`vhd:${base}`] } }).inspect(`vhd:${child}`);
  t.true(explicit.wouldOpen);
  t.like(explicit.images[0].references[0], { resolved: `vhd:${base}`, chosen: true });
  const none = await new Inspector({ backing: { noBacking: true } }).inspect(`vhd:${child}`);
  t.regex(none.images[0].references[0].refused ?? '', /--no-backing/);
});

test('inspection of an image on nginx: same-origin names resolve to URLs, local files are refused', async (t) => {
  const { root, outside } = tempRoot();
  const web = path.join(root, 'web');
  fs.mkdirSync(web);
  fs.writeFileSync(path.join(outside, 'base.raw'), Buffer.alloc(65536, 1));
  await qcow2Naming(path.join(web, 'local.qcow2'), `file://${path.join(outside, 'base.raw')}`);
  await qemuImg(['create', '-q', '-f', 'qcow2', path.join(web, 'base.qcow2'), '1M']);
  await qcow2Naming(path.join(web, 'top.qcow2'), 'base.qcow2', { format: 'qcow2' });
  const nginx = await startNginx(web);
  t.teardown(() => nginx.stop());
  const local = await new Inspector().inspect(`qcow2:${nginx.base}/local.qcow2`);
  t.false(local.wouldOpen);
  t.regex(local.images[0].references[0].refused ?? '', /a URL image may not reach a local file/);
  const chain = await new Inspector().inspect(`${nginx.base}/top.qcow2`);
  t.true(chain.wouldOpen);
  t.is(chain.images.length, 2);
  t.is(chain.images[0].references[0].resolved, `${nginx.base}/base.qcow2`);
  t.like(chain.images[1], { location: `${nginx.base}/base.qcow2`, format: 'qcow2' });
});

test('check: qemu-made images of every kind are sound, as qemu-img check says', async (t) => {
  const { vm } = tempRoot();
  const base = path.join(vm, 'base.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', base, '4M']);
  await qemuIo(base, ['write -P 0x11 0 300k', 'write -P 0x22 2m 64k']);
  await qemuImg(['snapshot', '-c', 'first', base]);
  await qemuIo(base, ['write -P 0x33 0 8k']);
  const top = path.join(vm, 'top.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-b', 'base.qcow2', '-F', 'qcow2', top]);
  await qemuIo(top, ['write -P 0x44 4k 2k']);
  const raw = path.join(vm, 'content.raw');
  fs.writeFileSync(raw, Buffer.from('compressible text '.repeat(200_000)));
  const compressed = path.join(vm, 'compressed.qcow2');
  await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', raw, compressed]);
  const vhd = await vpcImage(path.join(vm, 'disk.vhd'));
  for (const [image, format] of [[top, 'qcow2'], [compressed, 'qcow2'], [vhd, 'vpc']] as const) {
    // qemu-img check has no checks for vpc (exit 63): only qcow2 is cross-checked.
    if (format === 'qcow2') t.is(await qemuCheck(image, format), 0, `qemu-img check finds ${image} clean`);
    const { code, stdout, stderr } = await tapkit(['check', '--json', image], { timeoutMs: 60_000 });
    t.is(code, 0, `${image}: ${stdout}${stderr}`);
    const report = JSON.parse(stdout);
    t.true(report.sound);
    for (const level of report.images) t.deepEqual(level.problems, [], `${level.location}`);
  }
  const chain = JSON.parse((await tapkit(['check', '--json', top])).stdout);
  t.is(chain.images.length, 2, 'the backing file is checked too');
  // A filter owns no data: the image under it is what gets checked.
  const filtered = JSON.parse((await tapkit(['check', '--json', `cache:qcow2:${top}`])).stdout);
  t.like(filtered.images[0], { format: 'qcow2', location: top, problems: [] });
});

test('check: damage qemu-img check reports is found and named, exit 1', async (t) => {
  const { vm } = tempRoot();
  const make = async (name: string) => {
    const image = path.join(vm, `${name}.qcow2`);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', image, '4M']);
    await qemuIo(image, ['write -P 0x11 0 64k', 'write -P 0x22 1m 4k']);
    return image;
  };
  const cases: Array<[string, (image: string) => void, RegExp]> = [
    [
      'an L2 entry pointing into the L1 table',
      (image) => {
        const { l1Offset } = headerFields(image);
        const l2 = Number(readU64(image, l1Offset) & 0x00fffffffffffe00n);
        writeU64(image, l2, (1n << 63n) | BigInt(l1Offset));
      },
      /problem: l2_table\[\d+\]\[0\]: the L2 table at \d+ .*: entry 0 points to a data cluster at \d+ inside the L1 table/,
    ],
    [
      'an L1 entry pointing at the refcount table',
      (image) => {
        const { l1Offset } = headerFields(image);
        writeU64(image, l1Offset, (1n << 63n) | readU64(image, 48));
      },
      /problem: overlap: .*overlaps/,
    ],
    [
      'an L2 entry past the end of the file',
      (image) => {
        const { l1Offset } = headerFields(image);
        const l2 = Number(readU64(image, l1Offset) & 0x00fffffffffffe00n);
        writeU64(image, l2 + 8, (1n << 63n) | (1n << 40n));
      },
      /entry 1 points to 1099511627776, past the end of the \d+-byte file/,
    ],
  ];
  for (const [what, damage, expected] of cases) {
    const image = await make(what.replace(/\W+/g, '-'));
    damage(image);
    t.not(await qemuCheck(image), 0, `qemu-img check finds '${what}' wrong too`);
    const { code, stdout } = await tapkit(['check', image], { timeoutMs: 60_000 });
    t.is(code, 1, what);
    t.regex(stdout, expected, what);
    t.regex(stdout, /problems: [1-9]/);
  }
  // A VHD whose BAT entry points into its own BAT.
  const vhd = await vpcImage(path.join(vm, 'bad.vhd'));
  const bytes = fs.readFileSync(vhd);
  const tableOffset = Number(bytes.readBigUInt64BE(512 + 16));
  const entry = Buffer.alloc(4);
  entry.writeUInt32BE(tableOffset / 512);
  const fd = fs.openSync(vhd, 'r+');
  fs.writeSync(fd, entry, 0, 4, tableOffset);
  fs.closeSync(fd);
  const { code, stdout } = await tapkit(['check', vhd], { timeoutMs: 60_000 });
  t.is(code, 1);
  t.regex(stdout, /problem: bat\[0\]: BAT entry 0 .* points inside the image's metadata \(the BAT/);
});
