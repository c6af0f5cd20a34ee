/** forEachPiece (core/pieces.ts): the pieces tile the range exactly and none crosses a unit boundary. */
import test from 'ava';
import fc from 'fast-check';
import { forEachPiece } from '../core/pieces';

test('pieces tile the range in order, each inside one unit', (t) => {
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 1 << 30 }), fc.integer({ min: 0, max: 1 << 22 }), fc.integer({ min: 1, max: 1 << 21 }), (offset, length, size) => {
      let expectedDone = 0;
      forEachPiece(offset, length, size, (index, within, n, done) => {
        if (done !== expectedDone || n <= 0 || within < 0 || within + n > size) throw new Error(`bad piece ${index}/${within}/${n}/${done}`);
        if (index * size + within !== offset + done) throw new Error('piece does not start where the range continues');
        expectedDone += n;
      });
      return expectedDone === length;
    }),
  );
  t.pass();
});

test('a range inside one unit is one piece; an empty range is none', (t) => {
  const seen: number[][] = [];
  forEachPiece(4096 + 10, 100, 4096, (...args) => seen.push(args));
  t.deepEqual(seen, [[1, 10, 100, 0]]);
  forEachPiece(5, 0, 4096, () => t.fail());
});
