/**
 * The backing policy on real formats: qcow2 images made by qemu-img and VHD children of
 * qemu-made parents, naming hostile backing files (/etc/passwd, ../../outside, a /dev
 * node, a device node inside the tree, a symlink leaving the tree), are refused with the
 * rule named; the same names are opened when the operator allows them, and then read as
 * qemu reads them. Images on nginx may not reach local files.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import '../providers';
import { BlockError, isBlockError, Opener, Vbd, type OpenOptions } from '../core';
import { plantVhdParent, qcow2Naming, rebaseUnsafe, vhdChild, vpcImage } from './helpers/hostile';
import { startNginx, type Nginx } from './helpers/nginx';
import { qemuIo, qemuRaw, readAll } from './helpers/qemu-images';

interface Tree {
  root: string;
  /** Where the images under test live: root/images/vm. */
  vm: string;
  /** root/outside: base.raw and base.vhd, outside the images' tree. */
  outside: string;
  baseRaw: string;
  baseVhd: string;
}

const roots: string[] = [];
test.after.always(() => {
  for (const r of roots) fs.rmSync(r, { recursive: true, force: true });
});

async function tree(): Promise<Tree> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-security-'));
  roots.push(root);
  const vm = path.join(root, 'images', 'vm');
  const outside = path.join(root, 'outside');
  fs.mkdirSync(vm, { recursive: true });
  fs.mkdirSync(outside);
  const baseRaw = path.join(outside, 'base.raw');
  const pattern = Buffer.alloc(1024 * 1024);
  for (let i = 0; i < pattern.length; i++) pattern[i] = (i * 7 + (i >> 12)) & 0xff;
  fs.writeFileSync(baseRaw, pattern);
  const baseVhd = await vpcImage(path.join(outside, 'base.vhd'));
  return { root, vm, outside, baseRaw, baseVhd };
}

async function readSpec(spec: string, options: OpenOptions = {}): Promise<Buffer> {
  const top = await new Opener({ readOnly: true, warn: () => {}, ...options }).open(spec);
  const vbd = new Vbd(top, { name: spec });
  try {
    return await readAll(vbd, 192 * 1024);
  } finally {
    await vbd.close();
  }
}

async function refusal(spec: string, options: OpenOptions = {}): Promise<BlockError> {
  const error = await readSpec(spec, options).then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!isBlockError(error)) throw new Error(`expected a BlockError opening ${spec}, got ${String(error)}`);
  return error;
}

/** Each hostile name, the file it is planted in, and the rule its refusal must name. */
interface HostileCase {
  label: string;
  /** The name, given the tree (a symlink or device is made first when needed). */
  name: (t: Tree, kind: 'qcow2' | 'vhd') => string;
  rule: RegExp;
}

const CASES: HostileCase[] = [
  { label: '/etc/passwd', name: () => '/etc/passwd', rule: /backing policy \(outside the image's directory tree/ },
  { label: '../../outside', name: (_t, kind) => `../../outside/base.${kind === 'qcow2' ? 'raw' : 'vhd'}`, rule: /backing policy \(outside the image's directory tree/ },
  { label: 'a /dev node', name: () => '/dev/zero', rule: /backing policy \(no backing file under \/dev, \/proc or \/sys\)/ },
  {
    label: 'a device node inside the tree',
    name: (t) => {
      const node = path.join(t.vm, 'disk0');
      fs.rmSync(node, { force: true });
      // /dev/null's numbers: a character device, whatever it is called.
      require('node:child_process').execFileSync('mknod', [node, 'c', '1', '3'], { timeout: 10_000 });
      return 'disk0';
    },
    rule: /backing policy \(a backing file must be a regular file/,
  },
  {
    label: 'a symlink escaping the tree',
    name: (t, kind) => {
      const link = path.join(t.vm, `innocent.${kind === 'qcow2' ? 'raw' : 'vhd'}`);
      fs.rmSync(link, { force: true });
      fs.symlinkSync(kind === 'qcow2' ? t.baseRaw : t.baseVhd, link);
      return path.basename(link);
    },
    rule: /backing policy \(outside the image's directory tree/,
  },
];

for (const c of CASES) {
  test(`qcow2: a backing name pointing at ${c.label} is refused, naming the rule`, async (t) => {
    const tr = await tree();
    const name = c.name(tr, 'qcow2');
    const image = await qcow2Naming(path.join(tr.vm, 'hostile.qcow2'), name);
    const error = await refusal(image);
    t.is(error.code, 'EACCES');
    t.regex(error.message, c.rule);
    t.true(error.message.includes(`'${name}'`), error.message);
    // Naming the format does not change the verdict.
    t.regex((await refusal(`qcow2:${image}`)).message, c.rule);
  });

  test(`vhd: a parent locator pointing at ${c.label} is refused, naming the rule`, async (t) => {
    const tr = await tree();
    const name = c.name(tr, 'vhd');
    const child = vhdChild(path.join(tr.vm, 'hostile.vhd'), tr.baseVhd);
    plantVhdParent(child, name);
    const error = await refusal(`vhd:${child}`);
    t.is(error.code, 'EACCES');
    t.regex(error.message, c.rule);
    t.true(error.message.includes(name), error.message);
  });
}

test('qcow2: the same names open when allowed, and read as qemu reads them', async (t) => {
  const tr = await tree();
  // ../../outside, with data of the image's own over it.
  const image = await qcow2Naming(path.join(tr.vm, 'over-outside.qcow2'), '../../outside/base.raw');
  await qemuIo(image, ['write -P 0x11 64k 64k', 'write -P 0x22 900k 4k']);
  t.regex((await refusal(image)).message, /backing policy/);
  const got = await readSpec(image, { backing: { allow: [tr.outside] } });
  t.true(got.equals(await qemuRaw(image)), 'the chain reads as qemu-img convert reads it');
  t.is(got[0], fs.readFileSync(tr.baseRaw)[0]);

  // A symlink whose target is allowed: judged by where it leads.
  const link = path.join(tr.vm, 'innocent.raw');
  fs.symlinkSync(tr.baseRaw, link);
  const viaLink = await qcow2Naming(path.join(tr.vm, 'via-link.qcow2'), 'innocent.raw');
  t.regex((await refusal(viaLink)).message, /outside the image's directory tree/);
  t.true((await readSpec(viaLink, { backing: { allow: [tr.outside] } })).equals(await qemuRaw(viaLink)));

  // /etc/passwd itself, when /etc is allowed: bytes of the file, zeros past its end.
  const passwd = await qcow2Naming(path.join(tr.vm, 'passwd.qcow2'), '/etc/passwd', { size: '64k' });
  const read = await readSpec(passwd, { backing: { allow: ['/etc'] } });
  t.true(read.equals(await qemuRaw(passwd)));
  t.true(read.subarray(0, 4).equals(fs.readFileSync('/etc/passwd').subarray(0, 4)));

  // A file: URL names a local file and is judged like a path.
  const fileUrl = await qcow2Naming(path.join(tr.vm, 'file-url.qcow2'), `file://${tr.baseRaw}`);
  t.regex((await refusal(fileUrl)).message, /outside the image's directory tree/);
  t.true((await readSpec(fileUrl, { backing: { allow: [tr.outside] } })).equals(await qemuRaw(fileUrl)));
});

test('qcow2: devices stay refused whatever is allowed', async (t) => {
  const tr = await tree();
  const image = await qcow2Naming(path.join(tr.vm, 'dev.qcow2'), '/dev/zero');
  t.regex((await refusal(image, { backing: { allow: ['/dev', '/'] } })).message, /no backing file under \/dev/);
  const node = path.join(tr.vm, 'disk0');
  require('node:child_process').execFileSync('mknod', [node, 'c', '1', '3'], { timeout: 10_000 });
  const inTree = await qcow2Naming(path.join(tr.vm, 'node.qcow2'), 'disk0');
  t.regex((await refusal(inTree, { backing: { allow: [tr.vm] } })).message, /must be a regular file/);
});

test('qcow2: --backing replaces the hostile name, --no-backing refuses even a good one', async (t) => {
  const tr = await tree();
  const image = await qcow2Naming(path.join(tr.vm, 'named.qcow2'), '/etc/passwd');
  await qemuIo(image, ['write -P 0x33 128k 64k'], {});
  // The reference: the same image rebased (unsafely, names only) onto what the operator names.
  const reference = path.join(tr.vm, 'reference.qcow2');
  fs.copyFileSync(image, reference);
  await rebaseUnsafe(reference, tr.baseRaw);
  const got = await readSpec(image, { backing: { explicit: [`raw:${tr.baseRaw}`] } });
  t.true(got.equals(await qemuRaw(reference)));

  const good = await qcow2Naming(path.join(tr.vm, 'good.qcow2'), 'sibling.raw');
  fs.copyFileSync(tr.baseRaw, path.join(tr.vm, 'sibling.raw'));
  t.true((await readSpec(good)).equals(await qemuRaw(good)), 'a sibling in the tree opens by default');
  t.regex((await refusal(good, { backing: { noBacking: true } })).message, /backing policy \(--no-backing\)/);
});

test('vhd: the same parents open when allowed, and read as qemu reads the parent', async (t) => {
  const tr = await tree();
  const expected = await qemuRaw(tr.baseVhd, ['-f', 'vpc']);
  for (const name of ['../../outside/base.vhd', tr.baseVhd]) {
    const child = vhdChild(path.join(tr.vm, `child-${roots.length}-${name.length}.vhd`), tr.baseVhd);
    plantVhdParent(child, name);
    t.regex((await refusal(`vhd:${child}`)).message, /backing policy/);
    const got = await readSpec(`vhd:${child}`, { backing: { allow: [tr.outside] } });
    t.true(got.equals(expected), `the child over '${name}' reads its parent's bytes`);
  }
  // Through a symlink in the tree that leads to an allowed tree.
  const link = path.join(tr.vm, 'innocent.vhd');
  fs.symlinkSync(tr.baseVhd, link);
  const child = vhdChild(path.join(tr.vm, 'via-link.vhd'), tr.baseVhd);
  plantVhdParent(child, 'innocent.vhd');
  t.regex((await refusal(`vhd:${child}`)).message, /outside the image's directory tree/);
  t.true((await readSpec(`vhd:${child}`, { backing: { allow: [tr.outside] } })).equals(expected));
  // --no-backing refuses a differencing image's parent.
  t.regex((await refusal(`vhd:${child}`, { backing: { noBacking: true } })).message, /--no-backing/);
});

test('images on nginx never reach local files unless a directory is allowed', async (t) => {
  const tr = await tree();
  const web = path.join(tr.root, 'web');
  fs.mkdirSync(path.join(web, 'etc'), { recursive: true });
  // The server's own /etc/passwd: an absolute name under a URL image means this one.
  fs.writeFileSync(path.join(web, 'etc', 'passwd'), Buffer.alloc(4096, 0x77));
  const local = await qcow2Naming(path.join(web, 'local.qcow2'), `file://${tr.baseRaw}`);
  await qemuIo(local, ['write -P 0x44 0 4k']);
  await qcow2Naming(path.join(web, 'absolute.qcow2'), '/etc/passwd', { size: '64k' });
  const child = vhdChild(path.join(web, 'child.vhd'), tr.baseVhd);
  plantVhdParent(child, tr.baseVhd);
  let nginx: Nginx | undefined;
  try {
    nginx = await startNginx(web);
    // A file: name is a local file: refused for a URL image.
    const error = await refusal(`qcow2:${nginx.base}/local.qcow2`);
    t.is(error.code, 'EACCES');
    t.regex(error.message, /backing policy \(a URL image may not reach a local file; allow a directory with --allow-backing DIR\)/);
    // Allowed by the operator: opened, and read as qemu reads the same image locally.
    const got = await readSpec(`qcow2:${nginx.base}/local.qcow2`, { backing: { allow: [tr.outside] } });
    t.true(got.equals(await qemuRaw(local)));
    // A path name resolves on the server, never on the local disk.
    const absolute = await readSpec(`qcow2:${nginx.base}/absolute.qcow2`);
    t.true(absolute.subarray(0, 4096).equals(Buffer.alloc(4096, 0x77)), 'read the server\'s /etc/passwd, not ours');
    // A VHD naming a local absolute path looks for it on the server, where it is not.
    const vhdError = await refusal(`vhd:${nginx.base}/child.vhd`);
    t.not(vhdError.code, 'EACCES');
    t.regex(vhdError.message, new RegExp(`parent not found; tried .*${nginx.base.replace(/[.]/g, '\\.')}`));
  } finally {
    await nginx?.stop();
  }
});

test('a backing name holding a NUL byte is refused by the policy, shown escaped (found by the fuzzer)', async (t) => {
  const tr = await tree();
  const image = await qcow2Naming(path.join(tr.vm, 'nul.qcow2'), 'sibling.raw');
  fs.copyFileSync(tr.baseRaw, path.join(tr.vm, 'sibling.raw'));
  const bytes = fs.readFileSync(image);
  const at = bytes.indexOf('sibling.raw');
  bytes[at + 3] = 0;
  fs.writeFileSync(image, bytes);
  const error = await refusal(image);
  t.is(error.code, 'EACCES');
  t.regex(error.message, /backing policy \(a backing name may not hold a NUL byte\): .* names backing file 'sib\\x00ing\.raw'/);
  // A VHD whose locators hold a NUL: every candidate refused the same way, none reaches the file system.
  const child = vhdChild(path.join(tr.vm, 'nul.vhd'), tr.baseVhd);
  plantVhdParent(child, 'base\0.vhd');
  t.regex((await refusal(`vhd:${child}`)).message, /a backing name may not hold a NUL byte/);
});
