#!/usr/bin/env bash
# The test command (`npm test`): installs the Debian packages the tests need, builds,
# runs every ava test, and ends with one line counted from ava's TAP output:
#   N passed, N failed[, N skipped]
# Extra arguments go to ava (e.g. a file glob).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tmp
bash test/setup-system.sh || { echo "tapkit tests: could not install the Debian packages the tests need" >&2; echo "0 passed, 1 failed"; exit 1; }
# A clean build: a test file deleted from test/ must not keep running from a stale dist/.
rm -rf dist
npm run build --silent || { echo "0 passed, 1 failed"; exit 1; }
npx ava --tap "$@" 2>&1 | tee .tmp/ava.tap
status=${PIPESTATUS[0]}
taps=(.tmp/ava.tap)
rm -f .tmp/ava-xenlab.tap
# Then the Xen lab (docs/xen-lab.md: a real Xen and Linux guests under QEMU, 10-20 minutes
# on this 2-core machine) on its own ava configuration, counted with the rest; not when
# arguments picked some tests, and not with TAPKIT_XENLAB=0 (a quick local run).
lab_status=0
if [ $# -eq 0 ] && [ "${TAPKIT_XENLAB:-1}" != 0 ]; then
  npx ava --config test/xenlab/ava.config.mjs --tap 2>&1 | tee .tmp/ava-xenlab.tap
  lab_status=${PIPESTATUS[0]}
  taps+=(.tmp/ava-xenlab.tap)
fi
passed=$(cat "${taps[@]}" | grep -E "^ok [0-9]+" | grep -v -c -i "# SKIP")
skipped=$(cat "${taps[@]}" | grep -E '^ok [0-9]+' | grep -c -i '# SKIP')
failed=$(cat "${taps[@]}" | grep -c -E '^not ok [0-9]+')
# A crash outside any test (a worker that died, an uncaught exception) counts as a failure.
if [ "$status" -ne 0 ] && [ "$(grep -c -E '^not ok [0-9]+' .tmp/ava.tap)" -eq 0 ]; then failed=$((failed + 1)); fi
if [ "$lab_status" -ne 0 ] && [ "$(grep -c -E '^not ok [0-9]+' .tmp/ava-xenlab.tap)" -eq 0 ]; then failed=$((failed + 1)); fi
[ "$status" -eq 0 ] && status=$lab_status
summary="$passed passed, $failed failed"
[ "$skipped" -gt 0 ] && summary="$summary, $skipped skipped"
echo "$summary" > .tmp/test-summary
echo "$summary"
exit "$status"
