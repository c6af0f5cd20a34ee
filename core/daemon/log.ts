/** Structured logs: one JSON object per line, with a level threshold. */

export const LEVELS = ['debug', 'info', 'warn', 'error'] as const;
export type Level = (typeof LEVELS)[number];

export class Logger {
  private readonly threshold: number;

  constructor(
    private readonly out: NodeJS.WritableStream = process.stderr,
    level: Level = 'info',
    private readonly fields: Record<string, unknown> = {},
  ) {
    this.threshold = LEVELS.indexOf(level);
  }

  /** A logger that adds fields (a device id, an export) to every line. */
  child(fields: Record<string, unknown>): Logger {
    const child = new Logger(this.out, LEVELS[this.threshold], { ...this.fields, ...fields });
    return child;
  }

  log(level: Level, msg: string, fields: Record<string, unknown> = {}): void {
    if (LEVELS.indexOf(level) < this.threshold) return;
    this.out.write(`${JSON.stringify({ time: new Date().toISOString(), level, msg, ...this.fields, ...fields })}\n`);
  }

  debug(msg: string, fields?: Record<string, unknown>): void {
    this.log('debug', msg, fields);
  }
  info(msg: string, fields?: Record<string, unknown>): void {
    this.log('info', msg, fields);
  }
  warn(msg: string, fields?: Record<string, unknown>): void {
    this.log('warn', msg, fields);
  }
  error(msg: string, fields?: Record<string, unknown>): void {
    this.log('error', msg, fields);
  }
}

export function isLevel(value: string): value is Level {
  return (LEVELS as readonly string[]).includes(value);
}
