/**
 * What `tapkit convert -O FORMAT` writes into: each output format makes an empty image of
 * the source's size (reading as zeros everywhere, so holes need no writes) and names the
 * spec to open it with. `-o key=value,...` carries the format's creation options, named
 * as qemu-img names them (`subformat`, `block_size`).
 */
import * as fs from 'node:fs';
import { fromSystemError } from '../errors';
import { parseSize } from '../size';
import { createImage } from '../../providers/vhd/create';
import { UsageError } from './context';

export interface OutputFormat {
  /** The creation options it takes (`-o`). */
  options: readonly string[];
  /** Creates `file` (replacing a regular file) for a disk of `size` bytes; returns the spec to write through. */
  create(file: string, size: number, options: Readonly<Record<string, string>>): string;
}

const OUTPUT_FORMATS: Record<string, OutputFormat> = {
  raw: {
    options: [],
    create(file, size) {
      try {
        const fd = fs.openSync(file, 'w');
        try {
          fs.ftruncateSync(fd, size);
        } finally {
          fs.closeSync(fd);
        }
      } catch (e) {
        throw fromSystemError(e, `cannot create ${file}`);
      }
      return `raw:${file}`;
    },
  },
  vhd: {
    options: ['subformat', 'block_size'],
    create(file, size, options) {
      const type = options.subformat ?? 'dynamic';
      if (type !== 'dynamic' && type !== 'fixed') throw new UsageError(`-o subformat must be dynamic or fixed for vhd (got '${type}')`);
      const blockSize = options.block_size === undefined ? undefined : parseSize(options.block_size, '-o block_size');
      fs.rmSync(file, { force: true });
      createImage(file, { size, type, blockSize });
      return `vhd:${file}`;
    },
  },
};
// qemu-img's name for VHD.
OUTPUT_FORMATS.vpc = OUTPUT_FORMATS.vhd;

/** The output format named by -O, or a usage error listing the ones there are. */
export function outputFormat(name: string): OutputFormat {
  const format = Object.prototype.hasOwnProperty.call(OUTPUT_FORMATS, name) ? OUTPUT_FORMATS[name] : undefined;
  if (!format) throw new UsageError(`unsupported output format '${name}' (supported: ${Object.keys(OUTPUT_FORMATS).join(', ')})`);
  return format;
}

/** Parses `-o key=value,key=value` (repeatable) against what the format takes. */
export function creationOptions(format: string, given: readonly string[]): Record<string, string> {
  const known = outputFormat(format).options;
  const options: Record<string, string> = {};
  for (const item of given.flatMap((g) => g.split(','))) {
    if (item.trim() === '') continue;
    const eq = item.indexOf('=');
    const key = eq > 0 ? item.slice(0, eq).trim() : '';
    if (!key) throw new UsageError(`-o needs key=value (got '${item}')`);
    if (!known.includes(key)) {
      throw new UsageError(`output format ${format} has no option '${key}'${known.length ? ` (it takes: ${known.join(', ')})` : ' (it takes none)'}`);
    }
    options[key] = item.slice(eq + 1).trim();
  }
  return options;
}

/** A block device target: only raw can be written onto one. */
export function checkDeviceTarget(format: string, device: string): void {
  if (outputFormat(format) !== OUTPUT_FORMATS.raw) throw new UsageError(`${device} is a block device: only -O raw can be written onto one`);
}
