/**
 * Where the cache keeps block bytes: in memory, or in slots of a local file. Both are a
 * fixed number of slots of one block each; the cache decides which block owns a slot.
 */
import * as fs from 'node:fs';
import { fromSystemError } from '../../core/errors';

export interface BlockStore {
  readonly capacity: number;
  /** Copies `length` bytes of the slot, starting `within` it, into `target`. */
  read(slot: number, target: Uint8Array, within: number): Promise<void>;
  write(slot: number, data: Uint8Array): Promise<void>;
  /** Makes written slots durable (file stores) before an index naming them is saved. */
  sync(): Promise<void>;
  close(): Promise<void>;
}

export class MemoryStore implements BlockStore {
  private readonly slots: Array<Uint8Array | undefined>;
  constructor(readonly capacity: number) {
    this.slots = new Array(capacity);
  }
  async read(slot: number, target: Uint8Array, within: number): Promise<void> {
    target.set(this.slots[slot]!.subarray(within, within + target.length));
  }
  async write(slot: number, data: Uint8Array): Promise<void> {
    this.slots[slot] = Uint8Array.from(data);
  }
  async sync(): Promise<void> {}
  async close(): Promise<void> {
    this.slots.fill(undefined);
  }
}

export class FileStore implements BlockStore {
  private constructor(
    readonly capacity: number,
    private readonly blockSize: number,
    private readonly handle: fs.promises.FileHandle,
    readonly path: string,
  ) {}

  /** Opens (or creates) the slot file; it is sized sparsely to hold every slot. */
  static async open(path: string, capacity: number, blockSize: number): Promise<FileStore> {
    let handle: fs.promises.FileHandle;
    try {
      handle = await fs.promises.open(path, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    } catch (e) {
      throw fromSystemError(e, `cache: cannot open the cache file ${path}`);
    }
    try {
      await handle.truncate(capacity * blockSize);
    } catch (e) {
      await handle.close();
      throw fromSystemError(e, `cache: cannot size the cache file ${path}`);
    }
    return new FileStore(capacity, blockSize, handle, path);
  }

  async read(slot: number, target: Uint8Array, within: number): Promise<void> {
    let done = 0;
    while (done < target.length) {
      const { bytesRead } = await this.io(() => this.handle.read(target, done, target.length - done, slot * this.blockSize + within + done), 'read');
      if (bytesRead === 0) throw fromSystemError(new Error('short read'), `cache: ${this.path} is shorter than its slots`);
      done += bytesRead;
    }
  }

  async write(slot: number, data: Uint8Array): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.io(() => this.handle.write(data, done, data.length - done, slot * this.blockSize + done), 'write');
      done += bytesWritten;
    }
  }

  async sync(): Promise<void> {
    await this.io(() => this.handle.datasync(), 'fdatasync');
  }

  async close(): Promise<void> {
    await this.handle.close();
  }

  private async io<T>(fn: () => Promise<T>, what: string): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      throw fromSystemError(e, `cache: ${what} of ${this.path}`);
    }
  }
}
