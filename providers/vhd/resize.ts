/**
 * Growing an image. Fixed: a new footer at the new end, then the old footer's bytes (now
 * inside the disk) zeroed. Dynamic and differencing: when the BAT has room, only the
 * footers change; otherwise a larger BAT is written after the last block, the header is
 * pointed at it, and the footers change last. Each step is synced before the next, so an
 * interrupted resize leaves either the old or the new size, and an image that opens.
 */
import * as fs from 'node:fs';
import { BlockError } from '../../core/errors';
import { Opener } from '../../core/open';
import { DiskType, FOOTER_SIZE, serializeFooter } from './footer';
import { geometryFor } from './geometry';
import { serializeHeader } from './header';
import { loadLayout, MAX_BAT_ENTRIES } from './layout';
import { roundedSize } from './create';

export async function resizeImage(file: string, requested: number): Promise<{ oldSize: number; newSize: number }> {
  const newSize = roundedSize(requested);
  const source = await new Opener({ readOnly: true }).open(`raw:${file}`);
  let layout;
  try {
    layout = await loadLayout(source, file);
  } finally {
    await source.close();
  }
  const oldSize = layout.footer.currentSize;
  if (newSize < oldSize) throw new BlockError('EINVAL', `${file}: shrinking is not supported (${oldSize} → ${newSize} bytes)`);
  if (newSize === oldSize) return { oldSize, newSize };
  if (layout.footer.savedState) throw new BlockError('EROFS', `${file} holds a saved VM state; it must not be resized`);
  const footer = { ...layout.footer, currentSize: newSize, geometry: geometryFor(newSize) };
  const footerBytes = serializeFooter(footer);
  const fd = fs.openSync(file, 'r+');
  try {
    if (layout.footer.diskType === DiskType.Fixed) {
      writeAll(fd, footerBytes, newSize);
      fs.fsyncSync(fd);
      const stale = Math.min(layout.fileSize, newSize) - oldSize;
      if (stale > 0) writeAll(fd, Buffer.alloc(stale), oldSize);
      fs.ftruncateSync(fd, newSize + FOOTER_SIZE);
      fs.fsyncSync(fd);
      return { oldSize, newSize };
    }
    const header = { ...layout.header! };
    const needed = Math.ceil(newSize / header.blockSize);
    let end = Math.max(layout.dataEnd, Math.ceil(layout.footerOffset / 512) * 512);
    if (needed > header.maxTableEntries) {
      if (needed > MAX_BAT_ENTRIES) throw new BlockError('EFBIG', `${file}: ${newSize} bytes need more BAT entries than tapkit accepts`);
      // A larger BAT after the last block; the old one becomes unused space.
      const batBytes = Math.ceil((needed * 4) / 512) * 512;
      const bat = Buffer.alloc(batBytes, 0xff);
      layout.bat!.forEach((e, i) => bat.writeUInt32BE(e, i * 4));
      const batAt = end;
      end = batAt + batBytes;
      writeAll(fd, bat, batAt);
      // The old footer still describes the image; keep it at the end.
      writeAll(fd, serializeFooter({ ...layout.footer }), end);
      fs.fsyncSync(fd);
      header.tableOffset = batAt;
      header.maxTableEntries = needed;
      writeAll(fd, serializeHeader(header), Number(layout.footer.dataOffset));
      fs.fsyncSync(fd);
    }
    writeAll(fd, footerBytes, end);
    if (fs.fstatSync(fd).size > end + FOOTER_SIZE) fs.ftruncateSync(fd, end + FOOTER_SIZE);
    fs.fsyncSync(fd);
    writeAll(fd, footerBytes, 0);
    fs.fsyncSync(fd);
    return { oldSize, newSize };
  } finally {
    fs.closeSync(fd);
  }
}

function writeAll(fd: number, buf: Buffer, position: number): void {
  let done = 0;
  while (done < buf.length) done += fs.writeSync(fd, buf, done, buf.length - done, position + done);
}
