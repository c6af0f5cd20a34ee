/** The VHD format provider and its tools. Importing this module registers `vhd`. */
export { VhdProvider, probeVhd } from './provider';
