/**
 * The writer process of the VHD crash test: `node vhd-crash-writer.js SPEC SEED`. Runs the
 * seed's stream on the image through a Vbd, one op at a time, and reports on stdout (a
 * pipe: synchronous writes on Linux, so a line is out before the next op starts):
 *   start I       op I is about to be issued
 *   acked I       op I (a FUA write or zero) completed
 *   flushed I     the flush after op I completed
 * It runs until it is killed.
 */
import '../../providers';
import { Opener } from '../../core/open';
import { Vbd } from '../../core/vbd';
import { crashStream } from './vhd-crash-stream';

async function main(): Promise<void> {
  const [spec, seedText] = process.argv.slice(2);
  const provider = await new Opener({ readOnly: false, warn: () => {} }).open(spec);
  const vbd = new Vbd(provider);
  const say = (line: string) => process.stdout.write(`${line}\n`);
  say('ready');
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
