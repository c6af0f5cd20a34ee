/** The FUSE export: a VBD as one file on a FUSE mount, spoken on /dev/fuse without libfuse. */
export { FuseExport, FUSE_FSTYPE, type FuseExportOptions } from './export';
export { OneFileFs, FuseError, FILE_ID, type ReplySink, type OneFileOptions } from './filesystem';
export { DevFuseChannel } from './channel';
export * as protocol from './protocol';
