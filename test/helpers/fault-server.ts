/**
 * A small HTTP(S) server for fault tests: it serves named objects with ETags and byte
 * ranges like a static web server, and misbehaves on demand (drops connections, answers
 * 503/429 with Retry-After, stalls, ignores Range, refuses HEAD, redirects, asks for
 * Basic credentials). Every request is logged so tests can see what the client did.
 */
import * as crypto from 'node:crypto';
import * as http from 'node:http';
import * as https from 'node:https';
import type { AddressInfo } from 'node:net';

export interface Faults {
  /** Destroy the socket without answering, for the next N requests. */
  drop: number;
  /** Answer 503 (or `statusCode`) with Retry-After for the next N requests. */
  unavailable: number;
  unavailableStatus: number;
  retryAfterSeconds?: number;
  /** Wait this long before answering, for the next N requests. */
  stall: number;
  stallMs: number;
  /** Answer 200 with the whole object to ranged GETs. */
  ignoreRange: boolean;
  /** Answer 405 to HEAD. */
  refuseHead: boolean;
  /** Answer ranged GETs with a Content-Range one byte off from what was asked. */
  lieAboutRange: boolean;
  /** Require this `user:password` as Basic credentials. */
  basicAuth?: string;
}

export interface LoggedRequest {
  method: string;
  path: string;
  range?: string;
  ifMatch?: string;
  authorization?: string;
  headers: http.IncomingHttpHeaders;
}

export class FaultServer {
  readonly objects = new Map<string, { data: Buffer; etag: string }>();
  /** path → Location: answered 302. */
  readonly redirects = new Map<string, string>();
  readonly log: LoggedRequest[] = [];
  faults: Faults = FaultServer.noFaults();
  /** Bytes of object data written for answers that were 200 to a ranged GET. */
  wholeBodyBytesSent = 0;
  private server!: http.Server;
  base = '';

  static noFaults(): Faults {
    return { drop: 0, unavailable: 0, unavailableStatus: 503, stall: 0, stallMs: 0, ignoreRange: false, refuseHead: false, lieAboutRange: false };
  }

  /** Puts (or replaces) an object; a replaced one gets a new ETag, as on a real server. */
  put(path: string, data: Buffer): void {
    const etag = `"${crypto.createHash('sha1').update(data).update(String(Math.random())).digest('hex').slice(0, 16)}"`;
    this.objects.set(path, { data, etag });
  }

  async start(tls?: { key: string; cert: string }): Promise<this> {
    const handler = (req: http.IncomingMessage, res: http.ServerResponse) => void this.handle(req, res);
    this.server = tls ? https.createServer({ key: tls.key, cert: tls.cert }, handler) : http.createServer(handler);
    this.server.keepAliveTimeout = 60_000;
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    const port = (this.server.address() as AddressInfo).port;
    this.base = `${tls ? 'https' : 'http'}://127.0.0.1:${port}`;
    return this;
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const path = (req.url ?? '/').split('?')[0];
    this.log.push({ method: req.method ?? '', path, range: req.headers.range, ifMatch: req.headers['if-match'] as string | undefined, authorization: req.headers.authorization, headers: req.headers });
    const f = this.faults;
    if (f.drop > 0) {
      f.drop--;
      req.socket.destroy();
      return;
    }
    if (f.unavailable > 0) {
      f.unavailable--;
      const headers: Record<string, string> = {};
      if (f.retryAfterSeconds !== undefined) headers['retry-after'] = String(f.retryAfterSeconds);
      res.writeHead(f.unavailableStatus, headers).end('try later');
      return;
    }
    if (f.stall > 0) {
      f.stall--;
      await new Promise((r) => setTimeout(r, f.stallMs));
      if (req.socket.destroyed) return;
    }
    if (f.basicAuth && req.headers.authorization !== `Basic ${Buffer.from(f.basicAuth).toString('base64')}`) {
      res.writeHead(401, { 'www-authenticate': 'Basic realm="t"' }).end();
      return;
    }
    const redirect = this.redirects.get(path);
    if (redirect) {
      res.writeHead(302, { location: redirect }).end();
      return;
    }
    const object = this.objects.get(path);
    if (!object) {
      res.writeHead(404).end('not found');
      return;
    }
    const common = { etag: object.etag, 'content-type': 'application/octet-stream' };
    if (req.method === 'HEAD') {
      if (f.refuseHead) res.writeHead(405).end();
      else res.writeHead(200, { ...common, 'content-length': object.data.length, ...(f.ignoreRange ? {} : { 'accept-ranges': 'bytes' }) }).end();
      return;
    }
    const ifMatch = req.headers['if-match'];
    if (ifMatch && ifMatch !== object.etag && ifMatch !== '*') {
      res.writeHead(412, common).end();
      return;
    }
    const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
    if (!range || f.ignoreRange) {
      await this.sendWhole(res, object.data, common);
      return;
    }
    const start = Number(range[1]);
    const end = Math.min(Number(range[2]), object.data.length - 1);
    if (start >= object.data.length) {
      res.writeHead(416, { ...common, 'content-range': `bytes */${object.data.length}` }).end();
      return;
    }
    const shift = f.lieAboutRange ? 1 : 0;
    res.writeHead(206, { ...common, 'content-length': end - start + 1, 'content-range': `bytes ${start + shift}-${end + shift}/${object.data.length}` });
    res.end(object.data.subarray(start, end + 1));
  }

  /** Streams the whole object with backpressure, counting what got out before the client hung up. */
  private async sendWhole(res: http.ServerResponse, data: Buffer, headers: Record<string, string>): Promise<void> {
    res.writeHead(200, { ...headers, 'content-length': data.length });
    const piece = 64 * 1024;
    for (let at = 0; at < data.length; at += piece) {
      if (res.destroyed) return;
      const chunk = data.subarray(at, at + piece);
      this.wholeBodyBytesSent += chunk.length;
      if (!res.write(chunk)) {
        await new Promise<void>((resolve) => {
          const done = () => {
            res.off('drain', done);
            res.off('close', done);
            resolve();
          };
          res.on('drain', done);
          res.on('close', done);
        });
      }
    }
    res.end();
  }
}
