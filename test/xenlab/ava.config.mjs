// The Xen lab's ava configuration: test/run.sh runs it after the default suite (TAPKIT_XENLAB=0 leaves it out), npm run test:xenlab on its own.
export default {
  files: ['dist/test/lab/**/*.lab.js', 'dist/test/lab-backends/**/*.lab.js'],
  timeout: '50m',
  workerThreads: false,
  // One QEMU at a time: each lab file boots its own Xen.
  concurrency: 1,
};
