/**
 * The backing-file confinement policy (core/backing-policy.ts), driven through the real
 * opener with a test-only format whose image names its backing file.
 */
import test from 'ava';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import '../providers';
import './helpers/link-format';
import { linkImage } from './helpers/link-format';
import { BlockError, Opener, type OpenOptions, type Provider } from '../core';

function tree(): { root: string; images: string; outside: string } {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-policy-'));
  const images = path.join(root, 'images');
  const outside = path.join(root, 'outside');
  fs.mkdirSync(path.join(images, 'sub'), { recursive: true });
  fs.mkdirSync(outside);
  fs.writeFileSync(path.join(images, 'base.raw'), Buffer.alloc(4096, 0xab));
  fs.writeFileSync(path.join(images, 'sub', 'deep.raw'), Buffer.alloc(4096, 0xcd));
  fs.writeFileSync(path.join(outside, 'secret.raw'), Buffer.alloc(4096, 0xee));
  return { root, images, outside };
}

async function openAndRead(spec: string, options: OpenOptions = {}): Promise<number> {
  const p: Provider = await new Opener({ readOnly: true, warn: () => {}, ...options }).open(spec);
  try {
    const buf = Buffer.alloc(16);
    await p.read(buf, 0);
    return buf[0];
  } finally {
    await p.close();
  }
}

function image(dir: string, name: string, backing: string, format?: string): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, linkImage(backing, format));
  return file;
}

test('backing files inside the image tree open, relative and absolute', async (t) => {
  const { images } = tree();
  t.is(await openAndRead(image(images, 'a.link', 'base.raw', 'raw')), 0xab);
  t.is(await openAndRead(image(images, 'b.link', 'sub/deep.raw')), 0xcd);
  t.is(await openAndRead(image(images, 'c.link', path.join(images, 'base.raw'), 'raw')), 0xab);
});

for (const [label, name] of [
  ['/etc/passwd', '/etc/passwd'],
  ['a parent directory', '../outside/secret.raw'],
  ['a /dev node', '/dev/zero'],
  ['a /proc file', '/proc/self/environ'],
] as const) {
  test(`a backing name pointing at ${label} is refused with the policy named`, async (t) => {
    const { images } = tree();
    const err = await t.throwsAsync(openAndRead(image(images, 'x.link', name, 'raw')), { instanceOf: BlockError });
    t.is(err!.code, 'EACCES');
    t.regex(err!.message, /backing policy/);
    t.true(err!.message.includes(name));
  });
}

test('a symlink inside the tree that escapes it is refused', async (t) => {
  const { images, outside } = tree();
  fs.symlinkSync(path.join(outside, 'secret.raw'), path.join(images, 'innocent.raw'));
  const err = await t.throwsAsync(openAndRead(image(images, 'x.link', 'innocent.raw', 'raw')), { instanceOf: BlockError });
  t.regex(err!.message, /backing policy.*outside the image's directory tree/);
});

test('a local image may not name a URL backing file unless allowed', async (t) => {
  const { images } = tree();
  const err = await t.throwsAsync(openAndRead(image(images, 'x.link', 'http://127.0.0.1:1/base.raw', 'raw')), { instanceOf: BlockError });
  t.regex(err!.message, /a local image may not reach a URL/);
});

test('--allow-backing lets a chain reach another tree, and reads it correctly', async (t) => {
  const { images, outside } = tree();
  const file = image(images, 'x.link', '../outside/secret.raw', 'raw');
  await t.throwsAsync(openAndRead(file));
  t.is(await openAndRead(file, { backing: { allow: [outside] } }), 0xee);
});

test('--allow-backing never opens devices', async (t) => {
  const { images } = tree();
  const err = await t.throwsAsync(openAndRead(image(images, 'x.link', '/dev/zero', 'raw'), { backing: { allow: ['/'] } }));
  t.regex(err!.message, /backing policy/);
});

test('--no-backing refuses every backing file', async (t) => {
  const { images } = tree();
  const err = await t.throwsAsync(openAndRead(image(images, 'x.link', 'base.raw', 'raw'), { backing: { noBacking: true } }));
  t.regex(err!.message, /--no-backing/);
});

test('--backing names the chain explicitly and bounds its depth', async (t) => {
  const { images, outside } = tree();
  const file = image(images, 'x.link', '/etc/passwd', 'raw');
  // The image's own (hostile) name is ignored; the user's spec is used.
  t.is(await openAndRead(file, { backing: { explicit: [`raw:${path.join(outside, 'secret.raw')}`] } }), 0xee);
  // An image naming a deeper level than the user gave is refused.
  const two = image(images, 'two.link', 'x.link');
  const err = await t.throwsAsync(openAndRead(two, { backing: { explicit: [file] } }));
  t.regex(err!.message, /--backing names 1 level/);
});

test('a chain that loops is an ELOOP error, not a hang', async (t) => {
  const { images } = tree();
  image(images, 'a.link', 'b.link');
  const b = image(images, 'b.link', 'a.link');
  const err = await t.throwsAsync(openAndRead(b), { instanceOf: BlockError });
  t.is(err!.code, 'ELOOP');
});

test('a chain deeper than the limit is refused, naming the limit', async (t) => {
  const { images } = tree();
  let previous = 'base.raw';
  for (let i = 0; i < 6; i++) {
    image(images, `l${i}.link`, previous);
    previous = `l${i}.link`;
  }
  const top = path.join(images, 'l5.link');
  t.is(await openAndRead(top), 0xab);
  const err = await t.throwsAsync(openAndRead(top, { maxChainDepth: 3 }), { instanceOf: BlockError });
  t.is(err!.code, 'ELOOP');
  t.regex(err!.message, /--max-chain-depth/);
});
