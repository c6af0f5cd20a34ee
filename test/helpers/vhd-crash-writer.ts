/**
 * The writer process of the VHD crash test: `node vhd-crash-writer.js SPEC SEED LOG`. Runs the
 * seed's stream on the image through a Vbd, one op at a time, says `ready` on stdout, and
 * reports progress in the file LOG with a write(2) per line, so a line is in the file before
 * the next op starts and a SIGKILL cannot lose it. (Not stdout: once a pipe is full — one page
 * when the user's pipe quota is spent, on a loaded machine — Node queues stdout writes in the
 * process and the kill drops them; the test then saw ops on disk that its log never started.)
 *   start I       op I is about to be issued
 *   acked I       op I (a FUA write or zero) completed
 *   flushed I     the flush after op I completed
 * It runs until it is killed.
 */
import '../../providers';
import { Opener } from '../../core/open';
import { Vbd } from '../../core/vbd';
import * as fs from 'node:fs';
import { crashStream } from './vhd-crash-stream';

async function main(): Promise<void> {
  const [spec, seedText, logPath] = process.argv.slice(2);
  const log = fs.openSync(logPath, 'w');
  const provider = await new Opener({ readOnly: false, warn: () => {} }).open(spec);
  const vbd = new Vbd(provider);
  const say = (line: string) => fs.writeSync(log, `${line}\n`);
  process.stdout.write('ready\n');
  let i = 0;
  for (const op of crashStream(Number(seedText), provider.info().size)) {
    say(`start ${i}`);
    if (op.kind === 'write') await vbd.write(op.data!, op.offset, { fua: op.fua });
    else await vbd.zero(op.offset, op.length, { fua: op.fua, mayTrim: true });
    if (op.fua) say(`acked ${i}`);
    if (op.flushAfter) {
      await vbd.flush();
      say(`flushed ${i}`);
    }
    i++;
  }
}

main().catch((e) => {
  process.stderr.write(`crash writer: ${(e as Error).stack}\n`);
  process.exit(3);
});
