/** The conformance suite run for the built-in providers and the examples in examples/. */
import test from 'ava';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import '../providers';
import '../examples/pattern';
import '../examples/xor';
import { patternByte } from '../examples/pattern';
import { runConformance } from './conformance';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-conformance-'));
test.after.always(() => fs.rmSync(dir, { recursive: true, force: true }));
let files = 0;

/** A fresh sparse 64 MiB file for each test. */
function rawFile(): string {
  const file = path.join(dir, `disk-${files++}.img`);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, 64 * 1024 * 1024);
  return file;
}

runConformance(test, { name: 'memory', open: () => 'memory:1G' });
runConformance(test, { name: 'memory (limited)', open: () => 'memory,limit=8M:64M' });
runConformance(test, { name: 'raw', open: () => `raw:${rawFile()}` });
runConformance(test, { name: 'raw (bare path)', open: () => rawFile() });
// The event-loop path a file on tmpfs takes (raw's option io), on any file system.
runConformance(test, { name: 'raw (io=sync)', open: () => `raw,io=sync:${rawFile()}` });
runConformance(test, {
  name: 'example pattern',
  open: () => 'pattern:3M',
  readOnly: true,
  expected: (offset, length) => Uint8Array.from({ length }, (_, k) => patternByte(offset + k)),
});
runConformance(test, { name: 'example xor over memory', open: () => 'xor,key=0x5a:memory:16M' });
runConformance(test, { name: 'example xor over raw', open: () => `xor,key=0xff:raw:${rawFile()}` });
