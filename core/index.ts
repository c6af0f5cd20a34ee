/** tapkit's public API: what a provider author and an embedding program import. */
import 'reflect-metadata';

export * from './errors';
export * from './provider';
export * from './registry';
export { OpenRequest, type BackingOptions } from './open-request';
export { Opener, openSpec, resolveBacking, type OpenOptions } from './open';
export { parseSpec, type ParsedSpec } from './spec';
export { parseSize, formatSize } from './size';
export { forEachPiece } from './pieces';
export { Limits, LimitError, MetadataBudget, LIMIT_DEFINITIONS, DEFAULT_LIMITS, type LimitName, type LimitValues } from './limits';
export { Vbd, normalizeExtents, type VbdOptions } from './vbd';
export * from './stats';
