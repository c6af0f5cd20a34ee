/**
 * The XenStore tree of the `sim` platform: nodes with values and permissions, watches,
 * and optimistic transactions (XENSIM.md, "XenStore" and settled detail 14).
 *
 * A transaction works on its own copy of the tree and remembers every path it read or
 * wrote. Its commit conflicts (EAGAIN, nothing applied) when one of those paths changed
 * in the live tree after it started; otherwise its operations are replayed on the live
 * tree, firing watches as direct writes would.
 */

export class StoreError extends Error {
  constructor(
    readonly code: 'ENOENT' | 'EINVAL' | 'EACCES' | 'EEXIST' | 'EISDIR' | 'ENOTEMPTY' | 'EAGAIN' | 'E2BIG' | 'ENOSYS' | 'EIO' | 'ENOSPC' | 'EQUOTA',
    message?: string,
  ) {
    super(message ?? code);
  }
}

class Node {
  children = new Map<string, Node>();
  constructor(
    public value: Buffer,
    public perms: string[],
  ) {}

  clone(): Node {
    const copy = new Node(this.value, this.perms);
    for (const [name, child] of this.children) copy.children.set(name, child.clone());
    return copy;
  }
}

export const MAX_PATH = 3072;
const VALID_PATH = /^\/([A-Za-z0-9_@\-.]+(\/[A-Za-z0-9_@\-.]+)*)?$/;

export function checkPath(path: string): void {
  if (path.length > MAX_PATH || !VALID_PATH.test(path)) throw new StoreError('EINVAL', `invalid path '${path}'`);
}

function parentOf(path: string): string {
  const i = path.lastIndexOf('/');
  return i <= 0 ? '/' : path.slice(0, i);
}

function segments(path: string): string[] {
  return path === '/' ? [] : path.slice(1).split('/');
}

type Op =
  | { kind: 'write'; path: string; value: Buffer }
  | { kind: 'mkdir'; path: string }
  | { kind: 'rm'; path: string }
  | { kind: 'setPerms'; path: string; perms: string[] };

/** What changed: paths whose generation moves, and the watch events to fire. */
interface Change {
  changed: string[];
  event?: { path: string; removed: boolean };
}

/**
 * Nodes a guest domain may hold, as Xen's daemon's `quota-nodes` (default 1000). Every
 * connection acts as domain 0, so a node is charged by where it lives: at or below
 * `/local/domain/<N>` (N > 0) it is domain N's. Domain 0's own nodes are not limited.
 */
export const DEFAULT_NODES_PER_DOMAIN = 1000;
const DOMAIN_HOME = /^\/local\/domain\/([1-9]\d*)(?:\/|$)/;

/** Tree operations on one root (the live tree or a transaction's copy). */
class Tree {
  constructor(
    public root: Node,
    readonly nodesPerDomain: number,
  ) {}

  /**
   * Refuses (EQUOTA, nothing created) a write or mkdir that would create nodes past the
   * quota of the domain whose home holds `path`.
   */
  private checkQuota(path: string): void {
    const m = DOMAIN_HOME.exec(path);
    if (!m) return;
    const home = `/local/domain/${m[1]}`;
    let fresh = 0;
    let node: Node | undefined = this.root;
    let at = '';
    for (const name of segments(path)) {
      at += `/${name}`;
      node = node?.children.get(name);
      if (!node && at.length >= home.length) fresh++;
    }
    if (fresh === 0) return;
    const held = countNodes(this.find(home));
    if (held + fresh > this.nodesPerDomain) {
      throw new StoreError('EQUOTA', `domain ${m[1]} holds ${held} nodes; ${fresh} more would pass its quota of ${this.nodesPerDomain}`);
    }
  }

  find(path: string): Node | undefined {
    let node: Node | undefined = this.root;
    for (const name of segments(path)) {
      node = node.children.get(name);
      if (!node) return undefined;
    }
    return node;
  }

  get(path: string): Node {
    const node = this.find(path);
    if (!node) throw new StoreError('ENOENT', `no node ${path}`);
    return node;
  }

  /** Creates `path` and its missing parents (new nodes inherit their parent's permissions). */
  private ensure(path: string, changed: string[]): Node {
    let node = this.root;
    let at = '';
    for (const name of segments(path)) {
      at += `/${name}`;
      let child = node.children.get(name);
      if (!child) {
        child = new Node(Buffer.alloc(0), node.perms);
        node.children.set(name, child);
        changed.push(parentOf(at), at);
      }
      node = child;
    }
    return node;
  }

  apply(op: Op): Change {
    const changed: string[] = [];
    switch (op.kind) {
      case 'write': {
        this.checkQuota(op.path);
        const node = this.ensure(op.path, changed);
        node.value = op.value;
        changed.push(op.path);
        return { changed, event: { path: op.path, removed: false } };
      }
      case 'mkdir': {
        if (this.find(op.path)) return { changed };
        this.checkQuota(op.path);
        this.ensure(op.path, changed);
        return { changed, event: { path: op.path, removed: false } };
      }
      case 'setPerms': {
        this.get(op.path).perms = op.perms;
        changed.push(op.path);
        return { changed, event: { path: op.path, removed: false } };
      }
      case 'rm': {
        if (op.path === '/') throw new StoreError('EINVAL', 'cannot remove the root');
        const parentPath = parentOf(op.path);
        const parent = this.find(parentPath);
        if (!parent) throw new StoreError('ENOENT', `no node ${parentPath}`);
        const name = op.path.slice(op.path.lastIndexOf('/') + 1);
        const node = parent.children.get(name);
        if (!node) return { changed }; // RM of a missing node whose parent exists succeeds
        parent.children.delete(name);
        const gone = (n: Node, p: string) => {
          changed.push(p);
          for (const [c, child] of n.children) gone(child, `${p}/${c}`);
        };
        gone(node, op.path);
        changed.push(parentPath);
        return { changed, event: { path: op.path, removed: true } };
      }
    }
  }
}

function countNodes(node: Node | undefined): number {
  if (!node) return 0;
  let n = 1;
  for (const child of node.children.values()) n += countNodes(child);
  return n;
}

interface Transaction {
  id: number;
  startGen: number;
  tree: Tree;
  touched: Set<string>;
  ops: Op[];
}

export interface WatchRegistration {
  /** Absolute path watched. */
  path: string;
  /** Called with the absolute path to report. */
  fire(path: string): void;
}

export class Store {
  private readonly live: Tree;
  private gen = 0;
  private readonly changedAt = new Map<string, number>();
  private readonly transactions = new Map<number, Transaction>();
  private nextTx = 1;
  private readonly watches = new Set<WatchRegistration>();

  constructor(options: { nodesPerDomain?: number } = {}) {
    this.live = new Tree(new Node(Buffer.alloc(0), ['n0']), options.nodesPerDomain ?? DEFAULT_NODES_PER_DOMAIN);
    for (const path of ['/local/domain/0', '/tool']) this.mutate({ kind: 'mkdir', path });
  }

  private tx(id: number): Transaction | undefined {
    if (id === 0) return undefined;
    const t = this.transactions.get(id);
    if (!t) throw new StoreError('ENOENT', `no transaction ${id}`);
    return t;
  }

  private treeFor(txId: number, path: string): Tree {
    const t = this.tx(txId);
    if (!t) return this.live;
    t.touched.add(path);
    return t.tree;
  }

  read(path: string, txId = 0): Buffer {
    checkPath(path);
    return this.treeFor(txId, path).get(path).value;
  }

  directory(path: string, txId = 0): string[] {
    checkPath(path);
    return [...this.treeFor(txId, path).get(path).children.keys()];
  }

  getPerms(path: string, txId = 0): string[] {
    checkPath(path);
    return this.treeFor(txId, path).get(path).perms;
  }

  write(path: string, value: Buffer, txId = 0): void {
    this.change({ kind: 'write', path, value }, txId);
  }

  mkdir(path: string, txId = 0): void {
    this.change({ kind: 'mkdir', path }, txId);
  }

  rm(path: string, txId = 0): void {
    this.change({ kind: 'rm', path }, txId);
  }

  setPerms(path: string, perms: string[], txId = 0): void {
    if (perms.length === 0 || perms.some((p) => !/^[nrwb]\d+$/.test(p))) throw new StoreError('EINVAL', 'bad permissions');
    this.change({ kind: 'setPerms', path, perms }, txId);
  }

  private change(op: Op, txId: number): void {
    checkPath(op.path);
    const t = this.tx(txId);
    if (!t) return this.mutate(op);
    t.touched.add(op.path);
    t.touched.add(parentOf(op.path));
    t.tree.apply(op);
    t.ops.push(op);
  }

  /** Applies an operation to the live tree: generations move, watches fire. */
  private mutate(op: Op): void {
    const { changed, event } = this.live.apply(op);
    if (changed.length === 0) return;
    this.gen++;
    for (const p of changed) this.changedAt.set(p, this.gen);
    if (event) this.fireWatches(event.path, event.removed);
  }

  private fireWatches(path: string, removed: boolean): void {
    for (const w of [...this.watches]) {
      if (!this.watches.has(w)) continue;
      if (w.path === path || w.path === '/' || path.startsWith(`${w.path}/`)) w.fire(path);
      else if (removed && w.path.startsWith(`${path}/`)) w.fire(w.path);
    }
  }

  transactionStart(): number {
    const id = this.nextTx++;
    this.transactions.set(id, { id, startGen: this.gen, tree: new Tree(this.live.root.clone(), this.live.nodesPerDomain), touched: new Set(), ops: [] });
    return id;
  }

  /** Ends a transaction; throws EAGAIN (and applies nothing) when a commit conflicts. */
  transactionEnd(id: number, commit: boolean): void {
    const t = this.tx(id);
    if (!t) throw new StoreError('ENOENT', 'no transaction 0');
    this.transactions.delete(id);
    if (!commit) return;
    for (const p of t.touched) {
      if ((this.changedAt.get(p) ?? 0) > t.startGen) throw new StoreError('EAGAIN', `transaction ${id} conflicts at ${p}`);
    }
    // Nodes created outside the transaction since it started can make its own new nodes
    // pass a domain's quota: try the operations on a copy first, so a commit applies
    // all of them or none.
    if (t.ops.some((op) => op.kind === 'write' || op.kind === 'mkdir')) {
      const trial = new Tree(this.live.root.clone(), this.live.nodesPerDomain);
      for (const op of t.ops) trial.apply(op);
    }
    for (const op of t.ops) {
      try {
        this.mutate(op);
      } catch {
        // Cannot happen: the same operations succeeded on a copy of the live tree.
      }
    }
  }

  abortTransactions(ids: Iterable<number>): void {
    for (const id of ids) this.transactions.delete(id);
  }

  /** Adds a watch and fires it once. */
  watch(w: WatchRegistration): void {
    checkPath(w.path);
    this.watches.add(w);
    w.fire(w.path);
  }

  unwatch(w: WatchRegistration): void {
    this.watches.delete(w);
  }
}
