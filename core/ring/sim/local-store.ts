/** The XenStore interface over the sim Store in the same process (the backend's view, as domain 0). */
import type { TxId, Watch, XenStore } from '../platform';
import { Store, StoreError } from './store';

export class LocalXenStore implements XenStore {
  constructor(private readonly store: Store) {}

  async read(path: string, tx: TxId = 0): Promise<string | undefined> {
    try {
      return this.store.read(path, tx).toString('utf8');
    } catch (e) {
      if (e instanceof StoreError && e.code === 'ENOENT' && !String(e.message).startsWith('no transaction')) return undefined;
      throw e;
    }
  }

  async write(path: string, value: string, tx: TxId = 0): Promise<void> {
    this.store.write(path, Buffer.from(value, 'utf8'), tx);
  }

  async directory(path: string, tx: TxId = 0): Promise<string[]> {
    try {
      return this.store.directory(path, tx);
    } catch (e) {
      if (e instanceof StoreError && e.code === 'ENOENT' && !String(e.message).startsWith('no transaction')) return [];
      throw e;
    }
  }

  async rm(path: string, tx: TxId = 0): Promise<void> {
    try {
      this.store.rm(path, tx);
    } catch (e) {
      if (!(e instanceof StoreError && e.code === 'ENOENT')) throw e;
    }
  }

  async watch(path: string, onChange: (path: string) => void): Promise<Watch> {
    let live = true;
    // Events are delivered on a later turn, as they would arrive from a socket.
    const registration = { path, fire: (p: string) => setImmediate(() => live && onChange(p)) };
    this.store.watch(registration);
    return {
      cancel: async () => {
        live = false;
        this.store.unwatch(registration);
      },
    };
  }

  async transactionStart(): Promise<TxId> {
    return this.store.transactionStart();
  }

  async transactionEnd(tx: TxId, commit: boolean): Promise<boolean> {
    try {
      this.store.transactionEnd(tx, commit);
      return true;
    } catch (e) {
      if (e instanceof StoreError && e.code === 'EAGAIN') return false;
      throw e;
    }
  }
}
