/** The NBD export: an embeddable server over named VBDs (see server.ts). */
export { NbdServer, type NbdServerOptions, type NbdTlsOptions, type ListenTarget } from './server';
export { type NbdExport, transmissionFlags, blockSizes } from './export';
export { nbdErrorFor } from './protocol';
