/**
 * The fuzzing corpus: small real images of every format, made by qemu-img and qemu-io
 * (VHD differencing children, which qemu-img cannot make, by tapkit's createChild over
 * a qemu-made parent, written through the VHD provider). Every byte of data they hold
 * comes from the patterns below, and a canary file outside their tree holds a marker no
 * image contains: a read that returns the marker has left the chain.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import '../../providers';
import { Opener } from '../../core';
import { qemuImg, qemuIo } from '../helpers/qemu-images';
import { vhdChild } from '../helpers/hostile';

/** Appears in the canary file and nowhere in the corpus. */
export const CANARY_MARKER = Buffer.from('~~CANARY~BYTES~~');

export interface CorpusImage {
  name: string;
  /** The format family whose mutators apply. */
  format: 'qcow2' | 'vhd';
  /** The files of the chain, top first; the fuzzer mutates one of them. */
  files: string[];
  /** The spec the fuzzer opens (format named: probing is not what is fuzzed). */
  spec: string;
  /** Other specs over the same files, opened in the same case (a snapshot by name). */
  alsoOpen?: string[];
}

export interface Corpus {
  /** The tree the images live in (images/), inside `root`. */
  root: string;
  images: string;
  /** root/canary.raw: outside the images' tree. */
  canary: string;
  entries: CorpusImage[];
}

export const CORPUS_NAMES = [
  'qcow2-plain',
  'qcow2-v2',
  'qcow2-compressed',
  'qcow2-zstd',
  'qcow2-extl2',
  'qcow2-chain',
  'qcow2-snapshot',
  'qcow2-datafile',
  'vhd-dynamic',
  'vhd-fixed',
  'vhd-differencing',
] as const;

/** Builds the named corpus entries (all by default) under `root`. */
export async function buildCorpus(root: string, names: readonly string[] = CORPUS_NAMES): Promise<Corpus> {
  const images = path.join(root, 'images');
  fs.mkdirSync(images, { recursive: true });
  const canary = path.join(root, 'canary.raw');
  fs.writeFileSync(canary, Buffer.concat(Array.from({ length: 8 * 65536 }, () => CANARY_MARKER)));
  // Names an image might be mutated to use: a symlink in the tree to the canary, a directory loop.
  fs.symlinkSync(canary, path.join(images, 'link.raw'));
  fs.symlinkSync('.', path.join(images, 'a'));
  const entries: CorpusImage[] = [];
  const file = (name: string) => path.join(images, name);
  const qcow2 = async (name: string, options: string, size: string, writes: string[]) => {
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', options, file(name), size]);
    if (writes.length) await qemuIo(file(name), writes);
    return file(name);
  };
  for (const name of names) {
    switch (name) {
      case 'qcow2-plain':
        entries.push({ name, format: 'qcow2', files: [await qcow2('plain.qcow2', 'cluster_size=64k', '4M', ['write -P 0x11 0 200k', 'write -P 0x22 3m 64k'])], spec: `qcow2:${file('plain.qcow2')}` });
        break;
      case 'qcow2-v2':
        entries.push({ name, format: 'qcow2', files: [await qcow2('v2.qcow2', 'compat=0.10,cluster_size=4k', '1M', ['write -P 0x33 0 40k', 'write -P 0x44 512k 8k'])], spec: `qcow2:${file('v2.qcow2')}` });
        break;
      case 'qcow2-compressed': {
        const src = file('compressed-src.raw');
        fs.writeFileSync(src, Buffer.from('the quick brown fox jumps over the lazy dog; '.repeat(24000)));
        await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=16k', src, file('compressed.qcow2')]);
        fs.rmSync(src);
        entries.push({ name, format: 'qcow2', files: [file('compressed.qcow2')], spec: `qcow2:${file('compressed.qcow2')}` });
        break;
      }
      case 'qcow2-zstd': {
        const src = file('zstd-src.raw');
        fs.writeFileSync(src, Buffer.from('pack my box with five dozen liquor jugs. '.repeat(26000)));
        await qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=16k,compression_type=zstd', src, file('zstd.qcow2')]);
        fs.rmSync(src);
        entries.push({ name, format: 'qcow2', files: [file('zstd.qcow2')], spec: `qcow2:${file('zstd.qcow2')}` });
        break;
      }
      case 'qcow2-snapshot': {
        const image = await qcow2('snapshot.qcow2', 'cluster_size=4k', '1M', ['write -P 0x44 0 64k']);
        await qemuImg(['snapshot', '-c', 'before', image]);
        await qemuIo(image, ['write -P 0x55 32k 64k']);
        entries.push({ name, format: 'qcow2', files: [image], spec: `qcow2:${image}`, alsoOpen: [`qcow2,snapshot=before:${image}`] });
        break;
      }
      case 'qcow2-datafile': {
        const image = await qcow2('datafile.qcow2', `cluster_size=4k,data_file=${file('datafile.raw')},data_file_raw=on`, '1M', ['write -P 0x66 0 64k', 'write -P 0x11 512k 4k']);
        entries.push({ name, format: 'qcow2', files: [image, file('datafile.raw')], spec: `qcow2:${image}` });
        break;
      }
      case 'qcow2-extl2':
        entries.push({ name, format: 'qcow2', files: [await qcow2('extl2.qcow2', 'extended_l2=on,cluster_size=64k', '2M', ['write -P 0x55 0 2k', 'write -P 0x66 8k 4k', 'write -P 0x11 1m 64k'])], spec: `qcow2:${file('extl2.qcow2')}` });
        break;
      case 'qcow2-chain': {
        const base = await qcow2('chain-base.qcow2', 'cluster_size=4k', '1M', ['write -P 0x22 0 128k']);
        await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'chain-base.qcow2', '-F', 'qcow2', file('chain-top.qcow2')]);
        await qemuIo(file('chain-top.qcow2'), ['write -P 0x33 64k 16k']);
        entries.push({ name, format: 'qcow2', files: [file('chain-top.qcow2'), base], spec: `qcow2:${file('chain-top.qcow2')}` });
        break;
      }
      case 'vhd-dynamic':
        await qemuImg(['create', '-q', '-f', 'vpc', '-o', 'subformat=dynamic', file('dynamic.vhd'), '4M']);
        await qemuIo(file('dynamic.vhd'), ['write -P 0x44 0 96k', 'write -P 0x55 2m 8k'], { format: 'vpc' });
        entries.push({ name, format: 'vhd', files: [file('dynamic.vhd')], spec: `vhd:${file('dynamic.vhd')}` });
        break;
      case 'vhd-fixed': {
        const src = file('fixed-src.raw');
        fs.writeFileSync(src, Buffer.alloc(1024 * 1024, 0x66));
        await qemuImg(['convert', '-q', '-f', 'raw', '-O', 'vpc', '-o', 'subformat=fixed', src, file('fixed.vhd')]);
        fs.rmSync(src);
        entries.push({ name, format: 'vhd', files: [file('fixed.vhd')], spec: `vhd:${file('fixed.vhd')}` });
        break;
      }
      case 'vhd-differencing': {
        await qemuImg(['create', '-q', '-f', 'vpc', '-o', 'subformat=dynamic', file('parent.vhd'), '4M']);
        await qemuIo(file('parent.vhd'), ['write -P 0x11 0 64k', 'write -P 0x22 2m 4k'], { format: 'vpc' });
        vhdChild(file('child.vhd'), file('parent.vhd'));
        const child = await new Opener({ warn: () => {} }).open(`vhd:${file('child.vhd')}`);
        await child.write!(Buffer.alloc(8192, 0x33), 32768, {});
        await child.write!(Buffer.alloc(4096, 0x44), 3 * 1024 * 1024, {});
        await child.close();
        entries.push({ name, format: 'vhd', files: [file('child.vhd'), file('parent.vhd')], spec: `vhd:${file('child.vhd')}` });
        break;
      }
      default:
        throw new Error(`unknown corpus entry '${name}' (known: ${CORPUS_NAMES.join(', ')})`);
    }
  }
  return { root, images, canary, entries };
}
