/**
 * The daemon under a guest-like write stream (libnbd through the daemon's nbd export):
 * `pause` holds writes without losing or reordering any, and a live `snapshot` of a VHD
 * taken mid-stream leaves two consistent layers and the disk equal to what was written.
 * The disks are made by qemu-img and read back by qemu-img and 7-Zip.
 */
import test, { type ExecutionContext } from 'ava';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { DeviceStats, DeviceSummary } from '../core/daemon/devices';
import { startDaemon, type RunningDaemon } from './helpers/daemon';
import { qemuRaw, sevenZipRaw } from './helpers/vhd';
import { must, tapkit } from './helpers/run';

const ROOT = path.resolve(__dirname, '..', '..');
const WRITER = path.join(ROOT, 'test', 'helpers', 'write-stream.py');
const SLOTS = 40;
const BLOCK = 64 * 1024;

interface StreamResult {
  last: Record<string, number>;
  submitted: number;
  completed: number;
}

/** The python writer: its completion count as it goes, and its final report. */
function startStream(t: ExecutionContext, uri: string, dir: string) {
  const stopFile = path.join(dir, 'stop-writing');
  const child = spawn('/usr/bin/python3', [WRITER, uri, stopFile, String(SLOTS), String(BLOCK)], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => child.kill('SIGKILL'));
  let completed = 0;
  let report: StreamResult | undefined;
  let stderr = '';
  let pending = '';
  child.stdout.on('data', (chunk: Buffer) => {
    pending += chunk.toString();
    const lines = pending.split('\n');
    pending = lines.pop()!;
    for (const line of lines) {
      if (line.startsWith('{')) report = JSON.parse(line) as StreamResult;
      else if (line) completed = Number(line);
    }
  });
  child.stderr.on('data', (chunk) => (stderr += chunk));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return {
    completed: () => completed,
    /** Resolves once `count` writes have completed (bounded: a stuck stream fails the test). */
    async until(count: number, what: string): Promise<void> {
      const deadline = Date.now() + 120_000;
      while (completed < count) {
        if (child.exitCode !== null) throw new Error(`the writer exited (${child.exitCode}) before ${what}: ${stderr}`);
        if (Date.now() > deadline) throw new Error(`the stream stalled at ${completed} writes waiting for ${what}`);
        await sleep(50);
      }
    },
    async finish(): Promise<StreamResult> {
      fs.writeFileSync(stopFile, '');
      const code = await Promise.race([exited, sleep(120_000).then(() => 'timeout' as const)]);
      if (code !== 0 || !report) throw new Error(`the writer ended with ${code}: ${stderr}`);
      return report;
    },
  };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Every slot holds the last write submitted to it; the rest of the disk is zeros. */
function assertDisk(t: ExecutionContext, disk: Buffer, result: StreamResult, what: string): void {
  for (let slot = 0; slot < SLOTS; slot++) {
    const k = result.last[String(slot)];
    const expected = Buffer.alloc(BLOCK);
    if (k !== undefined) for (let i = 0; i < BLOCK; i += 8) expected.writeBigUInt64LE(BigInt(k), i);
    const got = disk.subarray(slot * BLOCK, (slot + 1) * BLOCK);
    if (!got.equals(expected)) {
      t.fail(`${what}: slot ${slot} holds write ${got.readBigUInt64LE(0)}, the last written was ${k}`);
      return;
    }
  }
  t.true(disk.subarray(SLOTS * BLOCK).every((b) => b === 0), `${what}: nothing written past the slots`);
}

/** Each slot of an older layer holds one whole write meant for it (or nothing): no torn write. */
function assertConsistent(t: ExecutionContext, disk: Buffer, result: StreamResult, what: string): void {
  for (let slot = 0; slot < SLOTS; slot++) {
    const got = disk.subarray(slot * BLOCK, (slot + 1) * BLOCK);
    if (got.every((b) => b === 0)) continue;
    const k = got.readBigUInt64LE(0);
    const whole = Buffer.alloc(BLOCK);
    for (let i = 0; i < BLOCK; i += 8) whole.writeBigUInt64LE(k, i);
    t.true(got.equals(whole) && Number(k) % SLOTS === slot && Number(k) <= result.last[String(slot)], `${what}: slot ${slot} is torn or foreign`);
  }
}

async function createWithNbd(daemon: RunningDaemon, spec: string): Promise<{ id: string; uri: string }> {
  const socket = path.join(daemon.dir, `nbd-${Math.random().toString(36).slice(2)}.sock`);
  const device = await daemon.ok<DeviceSummary>({ op: 'create', spec, exports: [`nbd:${socket}`] });
  return { id: device.id, uri: `nbd+unix:///?socket=${socket}` };
}

for (const format of ['raw', 'vpc'] as const) {
  test(`pause under a write stream (${format}): writes are held, none lost or reordered, and complete after unpause`, async (t) => {
    const daemon = await startDaemon();
    t.teardown(() => daemon.stop());
    const image = path.join(daemon.dir, `disk.${format}`);
    await must('qemu-img', ['create', '-q', '-f', format, ...(format === 'vpc' ? ['-o', 'subformat=dynamic'] : []), image, '8M']);
    const { id, uri } = await createWithNbd(daemon, `${format === 'vpc' ? 'vhd' : 'raw'}:${image}`);
    const stream = startStream(t, uri, daemon.dir);
    await stream.until(300, 'the first writes');

    await daemon.ok({ op: 'pause', device: id });
    // Replies already on their way may still arrive; after that, nothing moves.
    await sleep(500);
    const held = stream.completed();
    await sleep(1500);
    t.is(stream.completed(), held, 'a write completed on a paused device');
    const stats = await daemon.ok<DeviceStats>({ op: 'stats', device: id });
    t.true(stats.paused);
    t.is(stats.inFlight, 0, 'pause drained the requests in flight');
    t.true(stats.queued > 0, 'the writes issued while paused are waiting');

    await daemon.ok({ op: 'unpause', device: id });
    await stream.until(held + 300, 'writes after unpause');
    const result = await stream.finish();
    t.is(result.completed, result.submitted, 'every write submitted completed');
    const errors = (await daemon.ok<DeviceStats>({ op: 'stats', device: id })).operations.write.errors;
    t.is(errors, 0);
    await daemon.ok({ op: 'destroy', device: id });
    assertDisk(t, await qemuRaw(image, daemon.dir, format), result, 'the disk qemu-img reads');
  });
}

test('a live snapshot under a write stream: both layers consistent, the chain equal to what was written', async (t) => {
  const daemon = await startDaemon();
  t.teardown(() => daemon.stop());
  const base = path.join(daemon.dir, 'base.vhd');
  await must('qemu-img', ['create', '-q', '-f', 'vpc', '-o', 'subformat=dynamic', base, '8M']);
  const { id, uri } = await createWithNbd(daemon, `vhd:${base}`);
  const stream = startStream(t, uri, daemon.dir);
  await stream.until(300, 'the first writes');

  const child = path.join(daemon.dir, 'child.vhd');
  const snapshot = await tapkit(['ctl', '--control', daemon.control, 'snapshot', id, child]);
  t.is(snapshot.code, 0, snapshot.stderr);
  const atSnapshot = stream.completed();
  await stream.until(atSnapshot + 300, 'writes after the snapshot');
  const result = await stream.finish();
  t.is(result.completed, result.submitted);
  const [summary] = await daemon.ok<DeviceSummary[]>({ op: 'list' });
  t.is(summary.spec, `vhd:${child}`);
  await daemon.ok({ op: 'destroy', device: id });

  for (const image of [base, child]) {
    const check = await tapkit(['vhd', 'check', image]);
    t.is(check.code, 0, `tapkit vhd check ${image}: ${check.stdout}${check.stderr}`);
  }
  // The parent stopped changing at the snapshot: whole writes only, each one meant for its slot.
  assertConsistent(t, await qemuRaw(base, daemon.dir), result, 'the parent (qemu-img)');
  // The chain (7-Zip follows the child to its parent) holds every last write.
  assertDisk(t, await sevenZipRaw(child, daemon.dir), result, 'the chain (7-Zip)');
});
