/** A one-line progress bar for a terminal, redrawn at most ten times a second. */
import { formatSize } from '../size';

export function progressBar(stream: NodeJS.WriteStream): { update: (done: number, total: number) => void; done: () => void } {
  let last = 0;
  const draw = (done: number, total: number) => {
    const width = 30;
    const fraction = total === 0 ? 1 : done / total;
    const filled = Math.round(fraction * width);
    stream.write(`\r[${'#'.repeat(filled)}${' '.repeat(width - filled)}] ${(fraction * 100).toFixed(1).padStart(5)}%  ${formatSize(done)} / ${formatSize(total)}  `);
  };
  let latest: [number, number] = [0, 0];
  return {
    update(done, total) {
      latest = [done, total];
      const now = Date.now();
      if (now - last >= 100 || done === total) {
        last = now;
        draw(done, total);
      }
    },
    done() {
      draw(latest[1], latest[1]);
      stream.write('\n');
    },
  };
}
