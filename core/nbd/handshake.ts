/**
 * The fixed-newstyle handshake: greeting, client flags, then option haggling until the
 * client picks an export (EXPORT_NAME or GO) or leaves (ABORT, disconnect).
 *
 * Options run one at a time. Anything malformed that leaves the stream in a known state
 * gets an option error and haggling goes on; anything that does not (a bad magic, an
 * absurd length, too many options, an unknown export on EXPORT_NAME) ends the
 * connection. With TLS required, every option but STARTTLS and ABORT is refused with
 * ERR_TLS_REQD until TLS is up, so nothing about the exports leaks in clear.
 */
import type { BlockSizes, NbdExport } from './export';
import { blockSizes, transmissionFlags } from './export';
import {
  BASE_ALLOCATION, BASE_ALLOCATION_ID, CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, ERR_INVALID, ERR_POLICY,
  ERR_TLS_REQD, ERR_UNKNOWN, ERR_UNSUP, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
  INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, NBD_MAGIC, Opt, OPTION_REPLY_MAGIC,
  REP_ACK, REP_INFO, REP_META_CONTEXT, REP_SERVER, optionName,
} from './protocol';

/** The byte stream the handshake runs on (a plain socket, later perhaps TLS). */
export interface HandshakeIO {
  /** The next `n` bytes; rejects when the client goes away. */
  read(n: number): Promise<Buffer>;
  write(data: Buffer): void;
  /** Switches the stream to TLS (after the ACK was queued); resolves once it is up. */
  startTls(): Promise<void>;
}

export interface HandshakePolicy {
  exports: ReadonlyMap<string, NbdExport>;
  /** TLS is configured: required before anything but STARTTLS and ABORT. */
  tls: boolean;
  maxRequest: number;
  /** Options accepted in one handshake before the client is dropped (an option flood). */
  maxOptions: number;
}

/** What the client agreed on when it entered transmission. */
export interface Negotiated {
  export: NbdExport;
  structured: boolean;
  /** base:allocation was selected for this export. */
  allocationContext: boolean;
  flags: number;
  blockSizes: BlockSizes;
}

/** The connection must end (protocol violation or client abort); `reason` is for logs. */
export class HandshakeEnd extends Error {
  constructor(readonly reason: string, readonly clean = false) {
    super(reason);
  }
}

/** Longest option payload accepted (strings are at most 4 KiB; leave room for lists of them). */
const MAX_OPTION_LENGTH = 64 * 1024;
/** Longest string the protocol allows. */
const MAX_STRING = 4096;

export class Handshake {
  private structured = false;
  private tlsUp = false;
  /** Export whose base:allocation context was selected by SET_META_CONTEXT. */
  private metaExport: string | undefined;
  private noZeroes = false;

  constructor(private readonly io: HandshakeIO, private readonly policy: HandshakePolicy) {}

  /** Runs the handshake; resolves with the chosen export, or throws HandshakeEnd. */
  async run(): Promise<Negotiated> {
    const greeting = Buffer.alloc(18);
    greeting.writeBigUInt64BE(NBD_MAGIC, 0);
    greeting.writeBigUInt64BE(IHAVEOPT, 8);
    greeting.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
    this.io.write(greeting);

    const clientFlags = (await this.io.read(4)).readUInt32BE(0);
    if (clientFlags & ~(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)) throw new HandshakeEnd(`unknown client flags 0x${clientFlags.toString(16)}`);
    this.noZeroes = (clientFlags & CLIENT_NO_ZEROES) !== 0;

    for (let count = 0; ; count++) {
      if (count >= this.policy.maxOptions) throw new HandshakeEnd(`more than ${this.policy.maxOptions} options`);
      const header = await this.io.read(16);
      if (header.readBigUInt64BE(0) !== IHAVEOPT) throw new HandshakeEnd('bad option magic');
      const option = header.readUInt32BE(8);
      const length = header.readUInt32BE(12);
      if (length > MAX_OPTION_LENGTH) throw new HandshakeEnd(`${optionName(option)} with ${length} bytes of data`);
      const data = length > 0 ? await this.io.read(length) : Buffer.alloc(0);
      const done = await this.option(option, data);
      if (done) return done;
    }
  }

  private async option(option: number, data: Buffer): Promise<Negotiated | undefined> {
    if (this.policy.tls && !this.tlsUp && option !== Opt.STARTTLS && option !== Opt.ABORT) {
      if (option === Opt.EXPORT_NAME) throw new HandshakeEnd('EXPORT_NAME before STARTTLS on a TLS-only server');
      this.error(option, ERR_TLS_REQD, 'TLS is required: send STARTTLS first');
      return undefined;
    }
    switch (option) {
      case Opt.EXPORT_NAME:
        return this.exportName(data);
      case Opt.ABORT:
        this.reply(option, REP_ACK);
        throw new HandshakeEnd('client aborted', true);
      case Opt.LIST:
        this.list(data);
        return undefined;
      case Opt.STARTTLS:
        await this.startTls(data);
        return undefined;
      case Opt.INFO:
      case Opt.GO:
        return this.infoOrGo(option, data);
      case Opt.STRUCTURED_REPLY:
        if (data.length !== 0) return this.error(option, ERR_INVALID, 'STRUCTURED_REPLY carries no data');
        this.structured = true;
        this.reply(option, REP_ACK);
        return undefined;
      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT:
        this.metaContext(option, data);
        return undefined;
      default:
        return this.error(option, ERR_UNSUP, `${optionName(option)} is not supported`);
    }
  }

  private exportName(data: Buffer): Negotiated {
    const name = data.toString('utf8');
    const found = this.policy.exports.get(name);
    // EXPORT_NAME cannot report errors: an unknown export ends the connection.
    if (!found) throw new HandshakeEnd(`unknown export '${name}'`);
    const negotiated = this.negotiated(found);
    const reply = Buffer.alloc(this.noZeroes ? 10 : 134);
    writeU64(reply, negotiated.export.vbd.info().size, 0);
    reply.writeUInt16BE(negotiated.flags, 8);
    this.io.write(reply);
    return negotiated;
  }

  private list(data: Buffer): void {
    if (data.length !== 0) return this.error(Opt.LIST, ERR_INVALID, 'LIST carries no data');
    for (const exp of this.policy.exports.values()) {
      const name = Buffer.from(exp.name, 'utf8');
      const description = Buffer.from(exp.description ?? '', 'utf8');
      const payload = Buffer.alloc(4 + name.length + description.length);
      payload.writeUInt32BE(name.length, 0);
      name.copy(payload, 4);
      description.copy(payload, 4 + name.length);
      this.reply(Opt.LIST, REP_SERVER, payload);
    }
    this.reply(Opt.LIST, REP_ACK);
  }

  private async startTls(data: Buffer): Promise<void> {
    if (data.length !== 0) return this.error(Opt.STARTTLS, ERR_INVALID, 'STARTTLS carries no data');
    if (!this.policy.tls) return this.error(Opt.STARTTLS, ERR_POLICY, 'this server has no TLS certificate');
    if (this.tlsUp) return this.error(Opt.STARTTLS, ERR_INVALID, 'TLS is already on');
    this.reply(Opt.STARTTLS, REP_ACK);
    try {
      await this.io.startTls();
    } catch (e) {
      throw new HandshakeEnd(`TLS handshake failed: ${(e as Error).message}`);
    }
    this.tlsUp = true;
    // Whatever was agreed in clear is forgotten.
    this.structured = false;
    this.metaExport = undefined;
  }

  private infoOrGo(option: number, data: Buffer): Negotiated | undefined {
    const parsed = parseInfoRequest(data);
    if (typeof parsed === 'string') return this.error(option, ERR_INVALID, parsed);
    const found = this.policy.exports.get(parsed.name);
    if (!found) return this.error(option, ERR_UNKNOWN, `no export named '${parsed.name}'`);
    const negotiated = this.negotiated(found);

    const exportInfo = Buffer.alloc(12);
    exportInfo.writeUInt16BE(INFO_EXPORT, 0);
    writeU64(exportInfo, found.vbd.info().size, 2);
    exportInfo.writeUInt16BE(negotiated.flags, 10);
    this.reply(option, REP_INFO, exportInfo);
    if (parsed.requests.includes(INFO_NAME)) {
      this.reply(option, REP_INFO, Buffer.concat([u16(INFO_NAME), Buffer.from(found.name, 'utf8')]));
    }
    if (parsed.requests.includes(INFO_DESCRIPTION) && found.description) {
      this.reply(option, REP_INFO, Buffer.concat([u16(INFO_DESCRIPTION), Buffer.from(found.description, 'utf8')]));
    }
    // Block sizes go out whether asked for or not (the spec allows it; clients that did not
    // ask may still send unaligned requests, which the VBD serves).
    const sizes = Buffer.alloc(14);
    sizes.writeUInt16BE(INFO_BLOCK_SIZE, 0);
    sizes.writeUInt32BE(negotiated.blockSizes.minimum, 2);
    sizes.writeUInt32BE(negotiated.blockSizes.preferred, 6);
    sizes.writeUInt32BE(negotiated.blockSizes.maximum, 10);
    this.reply(option, REP_INFO, sizes);
    this.reply(option, REP_ACK);
    return option === Opt.GO ? negotiated : undefined;
  }

  private metaContext(option: number, data: Buffer): void {
    const parsed = parseMetaRequest(data);
    if (typeof parsed === 'string') return this.error(option, ERR_INVALID, parsed);
    const set = option === Opt.SET_META_CONTEXT;
    if (set && !this.structured) return this.error(option, ERR_INVALID, 'SET_META_CONTEXT needs STRUCTURED_REPLY first');
    if (set) this.metaExport = undefined; // a new selection replaces the old one, even on failure
    if (!this.policy.exports.has(parsed.name)) return this.error(option, ERR_UNKNOWN, `no export named '${parsed.name}'`);
    // base:allocation matches itself, and on LIST also "base:" and an empty query list.
    const matches = set
      ? parsed.queries.includes(BASE_ALLOCATION)
      : parsed.queries.length === 0 || parsed.queries.some((q) => q === BASE_ALLOCATION || q === 'base:');
    if (matches) {
      const name = Buffer.from(BASE_ALLOCATION);
      const payload = Buffer.alloc(4 + name.length);
      payload.writeUInt32BE(set ? BASE_ALLOCATION_ID : 0, 0);
      name.copy(payload, 4);
      this.reply(option, REP_META_CONTEXT, payload);
      if (set) this.metaExport = parsed.name;
    }
    this.reply(option, REP_ACK);
  }

  private negotiated(exp: NbdExport): Negotiated {
    return {
      export: exp,
      structured: this.structured,
      allocationContext: this.structured && this.metaExport === exp.name,
      flags: transmissionFlags(exp.vbd, this.structured),
      blockSizes: blockSizes(exp.vbd, this.policy.maxRequest),
    };
  }

  private reply(option: number, type: number, payload: Buffer = Buffer.alloc(0)): void {
    const header = Buffer.alloc(20);
    header.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(type, 12);
    header.writeUInt32BE(payload.length, 16);
    this.io.write(payload.length ? Buffer.concat([header, payload]) : header);
  }

  private error(option: number, type: number, message: string): undefined {
    this.reply(option, type, Buffer.from(message, 'utf8'));
    return undefined;
  }
}

/** INFO/GO data: name length u32, name, request count u16, requests u16 each. */
export function parseInfoRequest(data: Buffer): { name: string; requests: number[] } | string {
  if (data.length < 6) return 'INFO/GO data too short';
  const nameLength = data.readUInt32BE(0);
  if (nameLength > MAX_STRING || 4 + nameLength + 2 > data.length) return 'export name length does not fit the option';
  const name = data.toString('utf8', 4, 4 + nameLength);
  const count = data.readUInt16BE(4 + nameLength);
  if (data.length !== 4 + nameLength + 2 + 2 * count) return 'INFO/GO request count does not match the option length';
  const requests: number[] = [];
  for (let i = 0; i < count; i++) requests.push(data.readUInt16BE(4 + nameLength + 2 + 2 * i));
  return { name, requests };
}

/** LIST/SET_META_CONTEXT data: name length u32, name, query count u32, queries (length u32 + string). */
export function parseMetaRequest(data: Buffer): { name: string; queries: string[] } | string {
  if (data.length < 8) return 'meta context data too short';
  const nameLength = data.readUInt32BE(0);
  if (nameLength > MAX_STRING || 4 + nameLength + 4 > data.length) return 'export name length does not fit the option';
  const name = data.toString('utf8', 4, 4 + nameLength);
  const count = data.readUInt32BE(4 + nameLength);
  let at = 4 + nameLength + 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return 'meta context query count does not match the option length';
    const length = data.readUInt32BE(at);
    at += 4;
    if (length > MAX_STRING || at + length > data.length) return 'meta context query length does not fit the option';
    queries.push(data.toString('utf8', at, at + length));
    at += length;
  }
  if (at !== data.length) return 'trailing bytes after the meta context queries';
  return { name, queries };
}

function u16(value: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(value, 0);
  return b;
}

/** Writes a non-negative integer (exact below 2^53) as u64. */
export function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / 0x100000000), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

