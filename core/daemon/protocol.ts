/**
 * The control protocol (docs/daemon.md): one JSON object per line each way.
 *
 *   → {"id": 1, "op": "create", "spec": "memory:1G", "exports": ["nbd:/run/tapkit/a.sock"]}
 *   ← {"id": 1, "ok": true, "result": {"id": "0", ...}}
 *   ← {"id": 2, "ok": false, "error": {"code": "ENOENT", "message": "no device '9'"}}
 *
 * Requests on one connection are answered in order. A line longer than MAX_LINE is
 * answered with an error and the connection is closed.
 */
import * as net from 'node:net';

export const MAX_LINE = 1 << 20;

export interface ControlRequest {
  id?: unknown;
  op: string;
  [field: string]: unknown;
}

export type ControlResponse =
  | { id?: unknown; ok: true; result: unknown }
  | { id?: unknown; ok: false; error: { code: string; message: string } };

/** Splits a byte stream into lines, refusing any line over `max` bytes. */
export class LineReader {
  private pending = '';
  constructor(
    private readonly onLine: (line: string) => void,
    private readonly onOverflow: () => void,
    private readonly max = MAX_LINE,
  ) {}

  push(chunk: Buffer): void {
    this.pending += chunk.toString('utf8');
    let newline: number;
    while ((newline = this.pending.indexOf('\n')) >= 0) {
      const line = this.pending.slice(0, newline);
      this.pending = this.pending.slice(newline + 1);
      if (line.length > this.max) return this.onOverflow();
      if (line.trim()) this.onLine(line);
    }
    if (this.pending.length > this.max) {
      this.pending = '';
      this.onOverflow();
    }
  }
}

/** Sends one request and waits for its answer (the client side of `tapkit ctl`). */
export function controlRequest(socketPath: string, request: ControlRequest, timeoutMs = 120_000): Promise<ControlResponse> {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection(socketPath);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no answer from the daemon on ${socketPath} within ${timeoutMs / 1000} s`));
    }, timeoutMs);
    const reader = new LineReader(
      (line) => {
        clearTimeout(timer);
        socket.end();
        try {
          resolve(JSON.parse(line) as ControlResponse);
        } catch {
          reject(new Error(`the daemon sent a malformed answer: ${line.slice(0, 200)}`));
        }
      },
      () => reject(new Error('the daemon sent an oversized answer')),
      64 << 20,
    );
    socket.on('data', (chunk) => reader.push(chunk));
    socket.on('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      const hint = e.code === 'ENOENT' || e.code === 'ECONNREFUSED' ? ' (is `tapkit daemon` running?)' : '';
      reject(new Error(`cannot reach the daemon on ${socketPath}: ${e.code ?? e.message}${hint}`));
    });
    socket.on('connect', () => socket.write(`${JSON.stringify(request)}\n`));
  });
}
