/**
 * The provider conformance suite for the http source (over a real nginx) and for the
 * cache filter over memory, raw (in memory and file-backed) and http.
 */
import test from 'ava';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import '../providers';
import { runConformance } from './conformance';
import { startNginx, type Nginx } from './helpers/nginx';

const root = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-http-conf-root-'));
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-http-conf-'));
fs.chmodSync(root, 0o755);
const content = crypto.randomBytes(4 << 20);
fs.writeFileSync(path.join(root, 'disk.raw'), content);
let nginx: Nginx | undefined;
let files = 0;

test.before(async () => {
  nginx = await startNginx(root);
});
test.after.always(async () => {
  await nginx?.stop();
  fs.rmSync(root, { recursive: true, force: true });
  fs.rmSync(dir, { recursive: true, force: true });
});

function url(): string {
  if (!nginx) throw new Error('nginx is not running');
  return `${nginx.base}/disk.raw`;
}

/** A fresh sparse 16 MiB file. */
function rawFile(): string {
  const file = path.join(dir, `disk-${files++}.img`);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, 16 << 20);
  return file;
}

const expected = (offset: number, length: number) => content.subarray(offset, offset + length);

runConformance(test, { name: 'http over nginx', open: () => `http:${url()}`, readOnly: true, expected });
runConformance(test, { name: 'cache over http', open: () => `cache,size=512K,block=16K:http:${url()}`, readOnly: true, expected });
runConformance(test, { name: 'cache over memory', open: () => 'cache,size=256K,block=4K:memory:16M' });
runConformance(test, { name: 'cache over raw', open: () => `cache,size=1M,block=64K:raw:${rawFile()}` });
runConformance(test, { name: 'file-backed cache over raw', open: () => `cache,size=1M,block=16K,file=${path.join(dir, `c${files}.cache`)}:raw:${rawFile()}` });
