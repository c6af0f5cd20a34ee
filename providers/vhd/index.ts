/** The VHD format provider and its tools. Importing this module registers `vhd`. */
export { VhdProvider, probeVhd } from './provider';
export { snapshotVhd, snapshotOpenVhd, type SnapshotOptions, type SnapshotResult } from './snapshot';
export { createImage, createChild } from './create';
export { checkImage } from './check';
export { coalesceChild } from './coalesce';
export { resizeImage } from './resize';
