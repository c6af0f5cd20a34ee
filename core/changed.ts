/**
 * A source whose bytes changed under an open disk (an HTTP object replaced, a validator
 * that no longer matches) reports it with this error, so layers above that keep copies
 * of its bytes (the cache filter) drop them instead of serving a mix of old and new.
 */
import { BlockError } from './errors';

export class SourceChangedError extends BlockError {
  /** Marks the error across copies of tapkit loaded in one process. */
  readonly sourceChanged = true;
  constructor(message: string, options?: { cause?: unknown }) {
    super('EIO', message, options);
  }
}

export function isSourceChanged(e: unknown): boolean {
  return e instanceof SourceChangedError || (typeof e === 'object' && e !== null && (e as { sourceChanged?: unknown }).sourceChanged === true);
}
