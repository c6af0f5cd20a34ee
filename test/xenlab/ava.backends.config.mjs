// The backend-type lab (test/lab-backends: qdisk, vbd3, grant copy on a real Xen), run by
// test/xenlab/run-backends.sh. A second Xen boot of 25–40 min under TCG, so it is not part
// of `npm run test:xenlab` nor of test/run.sh.
export default {
  files: ['dist/test/lab-backends/**/*.lab.js'],
  timeout: '50m',
  workerThreads: false,
};
