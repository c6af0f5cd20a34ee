/**
 * The tapkit command line, run as a child process: providers, info (memory, a raw file,
 * a loop device), convert (sparse, checked with qemu-img compare and du), plugins, and
 * the bad input every command must answer with one line and the right exit code.
 */
import test from 'ava';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { patternByte } from '../examples/pattern';
import { CLI, ROOT, runCli, type CliResult } from './cli-runner';
import { must } from './helpers/run';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const PATTERN_PLUGIN = path.join(ROOT, 'dist', 'examples', 'pattern.js');
const XOR_PLUGIN = path.join(ROOT, 'dist', 'examples', 'xor.js');
/**
 * Runs a command as root without the capabilities that let root ignore file permissions
 * (the tests run as root, and chmod alone stops nobody). Unlike switching to another user,
 * this needs no access to the repository for that user.
 */
const WITHOUT_DAC = ['setpriv', '--bounding-set=-dac_override,-dac_read_search'];
/** A file root can no longer read once WITHOUT_DAC drops its capabilities: another owner's, mode 600. */
function makePrivate(file: string): void {
  fs.chownSync(file, 65534, 65534);
  fs.chmodSync(file, 0o600);
}

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tapkit-cli-'));
test.after.always(() => fs.rmSync(dir, { recursive: true, force: true }));
let files = 0;

function sparseFile(size: number, data: Array<[number, Buffer]> = []): string {
  const file = path.join(dir, `disk-${files++}.img`);
  const fd = fs.openSync(file, 'w');
  fs.ftruncateSync(fd, size);
  for (const [offset, bytes] of data) fs.writeSync(fd, bytes, 0, bytes.length, offset);
  fs.closeSync(fd);
  return file;
}

async function allocatedByDu(file: string): Promise<number> {
  return Number((await must('du', ['-B1', file])).split(/\s/)[0]);
}

/** An error is one line on stderr, starting `tapkit:`, without a stack trace. */
function oneLineError(t: { is: (a: unknown, b: unknown, m?: string) => void; regex: (s: string, r: RegExp, m?: string) => void; notRegex: (s: string, r: RegExp, m?: string) => void }, result: CliResult, code: number, pattern: RegExp): void {
  t.is(result.code, code, `exit code ${code} (stderr: ${result.stderr.trim()})`);
  const lines = result.stderr.trimEnd().split('\n');
  t.is(lines.length, 1, `one line on stderr, got: ${result.stderr}`);
  t.regex(lines[0], /^tapkit: /);
  t.regex(lines[0], pattern);
  t.notRegex(result.stderr, /^\s+at /m, 'no stack trace');
}

test('providers lists the built-ins, as text and as JSON', async (t) => {
  const text = await runCli(['providers']);
  t.is(text.code, 0, text.stderr);
  t.regex(text.stdout, /^memory\s+source\s+read,write,flush,trim,zero,extents\s+sparse RAM disk/m);
  t.regex(text.stdout, /^raw\s+source\s+.*regular file or block device/m);
  const json = await runCli(['providers', '--json']);
  t.is(json.code, 0, json.stderr);
  const list = JSON.parse(json.stdout) as Array<{ name: string; kind: string; capabilities: string[]; description: string; options?: string[] }>;
  const memory = list.find((p) => p.name === 'memory')!;
  t.like(memory, { kind: 'source', options: ['limit'] });
  t.true(memory.capabilities.includes('extents'));
  t.true(list.some((p) => p.name === 'raw' && p.kind === 'source'));
  t.true(list.every((p) => typeof p.description === 'string' && p.description.length > 0));
});

test('info on a sparse 1 TiB memory disk', async (t) => {
  const json = await runCli(['info', 'memory:1T', '--json']);
  t.is(json.code, 0, json.stderr);
  const report = JSON.parse(json.stdout);
  t.like(report, { spec: 'memory:1T', size: 2 ** 40, format: 'memory', allocatedBytes: 0 });
  t.deepEqual(report.chain, [{ provider: 'memory', kind: 'source' }]);
  t.true(report.capabilities.extents);
  const text = await runCli(['info', 'memory:1T']);
  t.is(text.code, 0, text.stderr);
  t.regex(text.stdout, /virtual size:\s+1 TiB \(1099511627776 bytes\)/);
  t.regex(text.stdout, /allocated:\s+0 B/);
});

test('info on a raw file, by raw: spec and by bare path', async (t) => {
  const file = sparseFile(64 * MiB, [[8 * MiB, randomBytes(MiB)]]);
  for (const spec of [`raw:${file}`, file]) {
    const result = await runCli(['info', spec, '--json']);
    t.is(result.code, 0, result.stderr);
    const report = JSON.parse(result.stdout);
    t.is(report.size, 64 * MiB);
    t.is(report.format, 'raw');
    t.is(report.chain[0].location, file);
    t.true(report.allocatedBytes >= MiB && report.allocatedBytes < 4 * MiB, `about 1 MiB allocated (${report.allocatedBytes})`);
  }
  const text = await runCli(['info', file]);
  t.regex(text.stdout, /virtual size:\s+64 MiB/);
  t.regex(text.stdout, /raw \(source\) \//);
});

test('info on a loop device reports its size', async (t) => {
  const file = sparseFile(40 * MiB + 512 * KiB);
  const device = (await must('losetup', ['-f', '--show', file])).trim();
  t.teardown(() => must('losetup', ['-d', device]));
  const json = await runCli(['info', device, '--json']);
  t.is(json.code, 0, json.stderr);
  const report = JSON.parse(json.stdout);
  t.is(report.size, 40 * MiB + 512 * KiB);
  t.is(report.chain[0].details.type, 'block device');
  const text = await runCli(['info', `raw:${device}`]);
  t.regex(text.stdout, new RegExp(`virtual size:\\s+40\\.5 MiB \\(${40 * MiB + 512 * KiB} bytes\\)`));
});

test('convert copies a 1 GiB file with 1 MiB written into an equal, sparse copy', async (t) => {
  const data = randomBytes(MiB);
  const source = sparseFile(GiB, [[300 * MiB + 4096, data]]);
  const target = path.join(dir, 'converted.img');
  const result = await runCli(['convert', source, target], { timeoutMs: 300_000 });
  t.is(result.code, 0, result.stderr);
  t.is(fs.statSync(target).size, GiB);
  await must('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', source, target], { timeoutMs: 300_000 });
  t.pass('qemu-img compare finds the copy identical');
  const fd = fs.openSync(target, 'r');
  const back = Buffer.alloc(MiB);
  fs.readSync(fd, back, 0, MiB, 300 * MiB + 4096);
  fs.closeSync(fd);
  t.true(back.equals(data), 'the written MiB is where it was');
  const used = await allocatedByDu(target);
  t.true(used >= MiB && used < 4 * MiB, `du shows about 1 MiB allocated (${used} bytes)`);
});

test('convert of a memory disk and over an existing larger target', async (t) => {
  const target = sparseFile(8 * MiB, [[0, Buffer.alloc(8 * MiB, 0xff)]]);
  // A regular file is truncated and rewritten: the old 0xff bytes are gone.
  const result = await runCli(['convert', 'memory:2M', target]);
  t.is(result.code, 0, result.stderr);
  t.is(fs.statSync(target).size, 2 * MiB);
  t.true(fs.readFileSync(target).every((b) => b === 0));
  const same = await runCli(['convert', target, target]);
  oneLineError(t, same, 2, /refusing to overwrite the source/);
  t.is(fs.statSync(target).size, 2 * MiB, 'the source is untouched');
  const format = await runCli(['convert', '-O', 'vmdk', 'memory:1M', path.join(dir, 'x.vmdk')]);
  oneLineError(t, format, 2, /unsupported output format 'vmdk'/);
});

test('convert --progress draws a bar on a terminal and stays silent in a pipe', async (t) => {
  const target = path.join(dir, 'progress.raw');
  // script(1) gives the command a pseudo-terminal, as a user's shell would.
  const shown = await must('script', ['-qec', `${process.execPath} ${CLI} convert --progress memory:64M ${target}`, '/dev/null']);
  t.regex(shown, /\[#{30}\] 100\.0%  64 MiB \/ 64 MiB/);
  t.is(fs.statSync(target).size, 64 * MiB);
  const piped = await runCli(['convert', '--progress', 'memory:1M', path.join(dir, 'progress2.raw')]);
  t.is(piped.code, 0, piped.stderr);
  t.is(piped.stderr, '');
});

test('bad input: one line naming the problem and the spec, exit 2 for usage, 1 for I/O', async (t) => {
  const missing = path.join(dir, 'no-such-disk.img');
  const cases: Array<[string[], number, RegExp]> = [
    [['info', 'nosuch:1G'], 2, /unknown provider 'nosuch' in spec 'nosuch:1G'/],
    [['info', 'memory:12Q'], 2, /malformed memory size '12Q' in spec 'memory:12Q'/],
    [['info', 'memory,color=red:1G'], 2, /no option 'color'.*memory,color=red:1G/],
    [['info', missing], 1, new RegExp(`no such file '${missing}'`)],
    [['info', `raw:${missing}`], 1, /no such file .*\(spec 'raw:/],
    [['info', dir], 1, new RegExp(`'${dir}' .*is a directory`)],
    [['info', 'raw:/dev/null'], 1, /neither a regular file nor a block device/],
    [['convert', 'memory:1M', dir], 1, /is a directory/],
    [['--plugin', path.join(dir, 'no-plugin.js'), 'providers'], 2, /cannot load plugin '.*no-plugin\.js': Cannot find module/],
    [['--plugin', 'tapkit-no-such-package', 'providers'], 2, /cannot load plugin 'tapkit-no-such-package'/],
    [['info', '--filter', 'memory', 'memory:1M'], 2, /'memory' is a source, not a filter/],
  ];
  for (const [args, code, pattern] of cases) {
    const result = await runCli(args);
    oneLineError(t, result, code, pattern);
  }
});

test('bad input: a file and a plugin that the user may not read', async (t) => {
  const secret = sparseFile(MiB);
  makePrivate(secret);
  const result = await runCli(['info', secret], { prefix: WITHOUT_DAC });
  oneLineError(t, result, 1, new RegExp(`permission denied .*'${secret}'`));
  const plugin = path.join(dir, 'private-plugin.js');
  fs.writeFileSync(plugin, 'module.exports = {};\n');
  makePrivate(plugin);
  const pluginResult = await runCli(['--plugin', plugin, 'providers'], { prefix: WITHOUT_DAC });
  oneLineError(t, pluginResult, 2, /cannot load plugin '.*private-plugin\.js': EACCES: permission denied/);
  const broken = path.join(dir, 'broken-plugin.js');
  fs.writeFileSync(broken, 'throw new Error("broken on purpose");\n');
  oneLineError(t, await runCli(['--plugin', broken, 'providers']), 2, /cannot load plugin .*broken on purpose/);
});

test('missing arguments are usage errors; --debug adds a stack trace', async (t) => {
  const noSpec = await runCli(['info']);
  t.is(noSpec.code, 2);
  t.regex(noSpec.stderr, /missing required argument 'spec'/);
  const debug = await runCli(['--debug', 'info', 'memory:12Q']);
  t.is(debug.code, 2);
  t.regex(debug.stderr, /^tapkit: malformed memory size/);
  t.regex(debug.stderr, /^\s+at /m, 'a stack trace with --debug');
});

test('plugins: the examples list, open, convert and filter through --plugin', async (t) => {
  const listed = await runCli(['--plugin', PATTERN_PLUGIN, '--plugin', XOR_PLUGIN, 'providers', '--json']);
  t.is(listed.code, 0, listed.stderr);
  const names = (JSON.parse(listed.stdout) as Array<{ name: string; kind: string }>).map((p) => `${p.name}:${p.kind}`);
  t.true(names.includes('pattern:source') && names.includes('xor:filter'), names.join(' '));

  // A relative module path, as the README shows it.
  const info = await runCli(['--plugin', './dist/examples/pattern.js', 'info', 'pattern:1M', '--json']);
  t.is(info.code, 0, info.stderr);
  t.like(JSON.parse(info.stdout), { size: MiB, format: 'pattern' });

  const out = path.join(dir, 'pattern.img');
  const converted = await runCli(['--plugin', PATTERN_PLUGIN, 'convert', 'pattern:1M', out]);
  t.is(converted.code, 0, converted.stderr);
  const bytes = fs.readFileSync(out);
  t.is(bytes.length, MiB);
  t.is(bytes.findIndex((b, i) => b !== patternByte(i)), -1, 'the copy holds the pattern');

  const plain = path.join(dir, 'plain.img');
  const filtered = await runCli(['--plugin', XOR_PLUGIN, 'convert', '--filter', 'xor,key=0x5a', out, plain]);
  t.is(filtered.code, 0, filtered.stderr);
  t.is(fs.readFileSync(plain).findIndex((b, i) => b !== (patternByte(i) ^ 0x5a)), -1, 'the filter XORed every byte');

  const badKey = await runCli(['--plugin', XOR_PLUGIN, 'info', 'xor,key=300:memory:1M']);
  oneLineError(t, badKey, 2, /xor key '300' in spec 'xor,key=300:memory:1M' must be a byte/);
});

test('plugins: a plain JavaScript package that requires tapkit, loaded by name', async (t) => {
  const project = fs.mkdtempSync(path.join(dir, 'project-'));
  const modules = path.join(project, 'node_modules');
  fs.mkdirSync(path.join(modules, 'tapkit-ones'), { recursive: true });
  fs.symlinkSync(ROOT, path.join(modules, 'tapkit'));
  fs.writeFileSync(
    path.join(modules, 'tapkit-ones', 'index.js'),
    `const { provider, parseSize } = require('tapkit');
class Ones {
  constructor(request) { this.name = 'ones'; this.size = parseSize(request.arg, 'size', request.spec); }
  info() { return { size: this.size, logicalBlockSize: 1, physicalBlockSize: 4096, readOnly: true }; }
  capabilities() { return { write: false, flush: false, fua: false, trim: false, zero: false, extents: false, multiConn: true, concurrent: true }; }
  async read(buf) { buf.fill(1); }
  async close() {}
}
provider({ name: 'ones', kind: 'source', description: 'all bytes are 1' })(Ones);
`,
  );
  const out = path.join(project, 'ones.img');
  const result = await runCli(['--plugin', 'tapkit-ones', 'convert', 'ones:64K', out], { cwd: project });
  t.is(result.code, 0, result.stderr);
  t.true(fs.readFileSync(out).every((b) => b === 1));
  t.is(fs.statSync(out).size, 64 * KiB);
});
