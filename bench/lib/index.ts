/** What benches share; see bench/README.md. */
export * from './cpu';
export * from './fio';
export * from './placement';
export * from './processes';
export * from './rounds';
export * from './stats';
export * from './summary';
export * from './table';
