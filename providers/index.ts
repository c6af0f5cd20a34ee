/** Importing this module registers every built-in provider. */
import './memory';
import './raw';
import './qcow2';
import './http';
import './cache';
import './vhd';
