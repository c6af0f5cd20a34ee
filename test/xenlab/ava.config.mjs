// The Xen lab on its own (npm run test:xenlab): not in the default test run, it takes minutes.
export default {
  files: ['dist/test/lab/**/*.lab.js'],
  timeout: '50m',
  workerThreads: false,
  // One QEMU at a time: each lab file boots its own Xen.
  concurrency: 1,
};
