/**
 * One client connection: owns the socket (plain, or TLS after STARTTLS), the bytes
 * received and not parsed yet, and the reply batching; runs the handshake, then hands
 * the connection to the transmission phase.
 *
 * Replies produced in one event-loop turn are corked and leave in one writev when the
 * turn ends, so a batch of pipelined requests is answered with one system call.
 *
 * Once transmission starts on a plain socket, the socket reads into our own memory
 * (direct-reads.ts): a reusable receive buffer, or the rest of a large WRITE payload.
 */
import type * as net from 'node:net';
import * as tls from 'node:tls';
import { ByteQueue } from './byte-queue';
import { readDirectly } from './direct-reads';
import { Handshake, HandshakeEnd, type HandshakeIO, type HandshakePolicy, type Negotiated } from './handshake';
import { Transmission, type ReplySink, type TransmissionHost, type TransmissionLimits } from './transmission';

export interface ConnectionOptions {
  policy: HandshakePolicy;
  limits: TransmissionLimits;
  /** Certificates for STARTTLS; `requestCert` when a CA is given (clients must present one). */
  tls?: { context: tls.SecureContext; requireClientCert: boolean };
  /** Milliseconds a client may take to finish the handshake. */
  handshakeTimeout: number;
  log: (message: string) => void;
}

/** Bytes the handshake lets pile up unread before it stops reading the socket. */
const HANDSHAKE_RECEIVE_LIMIT = 256 * 1024;
/** The reusable buffer reads land in during transmission (when the socket allows it). */
const RECEIVE_BUFFER = 128 * 1024;

export class NbdConnection implements HandshakeIO, ReplySink, TransmissionHost {
  private socket: net.Socket;
  private readonly queue = new ByteQueue();
  private waiting: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private transmission: Transmission | undefined;
  private corked = false;
  private ended = false;
  private socketPaused = false;
  private readonly closedPromise: Promise<void>;
  private resolveClosed!: () => void;
  private shuttingDown = false;
  /** Who this is, for log lines. */
  readonly peer: string;
  negotiated: Negotiated | undefined;

  constructor(socket: net.Socket, private readonly options: ConnectionOptions) {
    this.socket = socket;
    this.peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix socket';
    this.closedPromise = new Promise((resolve) => (this.resolveClosed = resolve));
    socket.setNoDelay?.(true);
    this.attach(socket);
  }

  /** Resolves when the socket is closed, for whatever reason. */
  get closed(): Promise<void> {
    return this.closedPromise;
  }

  /** Runs the connection to its end; never rejects. */
  async serve(): Promise<void> {
    const timer = setTimeout(() => this.abort('handshake timed out'), this.options.handshakeTimeout);
    try {
      this.negotiated = await new Handshake(this, this.options.policy).run();
    } catch (e) {
      clearTimeout(timer);
      if (e instanceof HandshakeEnd) {
        if (!e.clean) this.options.log(`${this.peer}: ${e.reason}`);
        this.endSoon();
      } else if (!this.ended) {
        this.abort((e as Error).message);
      }
      return this.closed;
    }
    clearTimeout(timer);
    if (this.shuttingDown) {
      this.endSoon();
      return this.closed;
    }
    this.transmission = new Transmission(this.negotiated, this.queue, this, this.options.limits, this);
    this.readDirectly();
    this.pump();
    return this.closed;
  }

  /** Graceful stop: parse nothing new, answer what is running, then close. */
  shutdown(): Promise<void> {
    this.shuttingDown = true;
    if (this.transmission) this.transmission.stop();
    else this.abort(); // still haggling: nothing was promised yet
    return this.closed;
  }

  // ---- HandshakeIO ------------------------------------------------------------------

  read(n: number): Promise<Buffer> {
    if (this.ended) return Promise.reject(new HandshakeEnd('connection closed'));
    if (this.queue.length >= n) return Promise.resolve(this.queue.take(n));
    this.resumeSocket();
    return new Promise((resolve, reject) => (this.waiting = { n, resolve, reject }));
  }

  write(data: Buffer): void {
    if (!this.ended) this.socket.write(data);
  }

  async startTls(): Promise<void> {
    const settings = this.options.tls;
    if (!settings) throw new Error('TLS is not configured');
    // The client must wait for our ACK before it starts TLS; bytes already here are a violation.
    if (this.queue.length > 0) throw new Error('data sent after STARTTLS before the reply');
    const plain = this.socket;
    this.detach(plain);
    const secure = new tls.TLSSocket(plain, {
      isServer: true,
      secureContext: settings.context,
      requestCert: settings.requireClientCert,
      rejectUnauthorized: settings.requireClientCert,
    });
    this.socket = secure;
    this.attach(secure);
    await new Promise<void>((resolve, reject) => {
      const fail = (e: Error) => reject(e);
      secure.once('error', fail);
      secure.once('close', () => reject(new Error('closed during the TLS handshake')));
      secure.once('secure', () => {
        secure.removeListener('error', fail);
        // A TLSSocket made by hand (not by tls.Server) never sets `authorized`: ask OpenSSL
        // for the verification result and insist on a certificate being there at all.
        if (settings.requireClientCert) {
          const verifyError = (secure as unknown as { ssl?: { verifyError?: () => Error | null } }).ssl?.verifyError?.();
          const certificate = secure.getPeerCertificate();
          if (verifyError) return reject(new Error(`client certificate refused: ${verifyError.message}`));
          if (!certificate || Object.keys(certificate).length === 0) return reject(new Error('client sent no certificate'));
        }
        resolve();
      });
    });
  }

  // ---- ReplySink --------------------------------------------------------------------

  send(data: Uint8Array, written?: () => void): void {
    if (this.ended) return;
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      setImmediate(this.uncork);
    }
    // The callback also runs when the write fails: either way the socket is done with `data`.
    if (written) this.socket.write(data, () => written());
    else this.socket.write(data);
  }

  get queuedBytes(): number {
    return this.socket.writableLength;
  }

  private readonly uncork = () => {
    this.corked = false;
    if (!this.ended) this.socket.uncork();
  };

  // ---- TransmissionHost -------------------------------------------------------------

  protocolError(reason: string): void {
    this.options.log(`${this.peer}: protocol error: ${reason}; disconnecting`);
    this.abort();
  }

  finished(): void {
    this.endSoon();
  }

  // ---- socket plumbing --------------------------------------------------------------

  private attach(socket: net.Socket): void {
    socket.on('data', this.onData);
    socket.on('drain', this.onDrain);
    socket.on('error', this.onError);
    socket.on('close', this.onClose);
    socket.on('end', this.onEnd);
  }

  private detach(socket: net.Socket): void {
    socket.removeListener('data', this.onData);
    socket.removeListener('drain', this.onDrain);
    socket.removeListener('error', this.onError);
    socket.removeListener('close', this.onClose);
    socket.removeListener('end', this.onEnd);
  }

  private readonly onData = (chunk: Buffer) => {
    this.queue.push(chunk);
    if (this.transmission) {
      this.pump();
      return;
    }
    const waiting = this.waiting;
    if (waiting && this.queue.length >= waiting.n) {
      this.waiting = undefined;
      waiting.resolve(this.queue.take(waiting.n));
    }
    if (this.queue.length > HANDSHAKE_RECEIVE_LIMIT) this.pauseSocket();
  };

  private readonly onDrain = () => this.pump();

  private readonly onError = (e: Error) => {
    if ((e as NodeJS.ErrnoException).code !== 'ECONNRESET' && (e as NodeJS.ErrnoException).code !== 'EPIPE') {
      this.options.log(`${this.peer}: ${e.message}`);
    }
  };

  private readonly onEnd = () => {
    // The client sent EOF: no more requests. Answer what is running, then close.
    if (this.transmission) this.transmission.stop();
    else this.abort();
  };

  private readonly onClose = () => {
    this.ended = true;
    this.queue.clear();
    this.waiting?.reject(new HandshakeEnd('client disconnected', true));
    this.waiting = undefined;
    this.resolveClosed();
  };

  /**
   * Has the socket read into our memory from now on, when it can: bytes the handshake
   * left in the stream's buffer are taken first, then 'data' events stop.
   */
  private readDirectly(): void {
    const socket = this.socket;
    const receiveBuffer = Buffer.allocUnsafe(RECEIVE_BUFFER);
    const switched = readDirectly(socket, {
      next: () => this.transmission?.payloadTarget() ?? receiveBuffer,
      received: (n, buf) => {
        if (this.ended) return;
        if (buf === receiveBuffer) this.queue.push(receiveBuffer.subarray(0, n), true);
        else this.transmission!.payloadReceived(n);
        this.pump();
        this.queue.settle();
      },
    });
    if (!switched) return;
    socket.removeListener('data', this.onData);
    for (let chunk: Buffer | null; socket.readableLength > 0 && (chunk = socket.read()) !== null; ) this.queue.push(chunk);
    // Stay flowing so that 'end' is still emitted; pauseSocket/resumeSocket stop and start reads.
    if (!this.socketPaused) socket.resume();
  }

  /** Parses what flow control admits, then reads more from the socket only if room is left. */
  private pump(): void {
    const transmission = this.transmission;
    if (!transmission || this.ended) return;
    transmission.pump();
    if (this.queue.length > transmission.receiveLimit) this.pauseSocket();
    else this.resumeSocket();
  }

  private pauseSocket(): void {
    if (!this.socketPaused) {
      this.socketPaused = true;
      this.socket.pause();
    }
  }

  private resumeSocket(): void {
    if (this.socketPaused) {
      this.socketPaused = false;
      this.socket.resume();
    }
  }

  /** Closes after the queued replies are written. */
  private endSoon(): void {
    if (this.ended) return;
    this.ended = true;
    if (this.corked) {
      this.corked = false;
      this.socket.uncork();
    }
    this.socket.end();
    // A client that never reads must not hold the connection open forever.
    setTimeout(() => this.socket.destroy(), 5_000).unref();
  }

  /** Drops the connection at once. */
  private abort(reason?: string): void {
    if (reason) this.options.log(`${this.peer}: ${reason}`);
    this.ended = true;
    this.socket.destroy();
  }
}
