// The backend-type lab (test/lab-backends: qdisk, vbd3, grant copy on a real Xen), run by
// test/xenlab/run-backends.sh on its own. test/xenlab/ava.config.mjs (npm run test:xenlab,
// and test/run.sh) runs it too, after the two-path lab: its second Xen boot takes about
// 2.5 minutes on a quiet 2-core machine (25–40 under heavy load).
export default {
  files: ['dist/test/lab-backends/**/*.lab.js'],
  timeout: '50m',
  workerThreads: false,
};
