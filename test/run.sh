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
passed=$(grep -E "^ok [0-9]+" .tmp/ava.tap | grep -v -c -i "# SKIP")
skipped=$(grep -E '^ok [0-9]+' .tmp/ava.tap | grep -c -i '# SKIP')
failed=$(grep -c -E '^not ok [0-9]+' .tmp/ava.tap)
# A crash outside any test (a worker that died, an uncaught exception) counts as a failure.
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
summary="$passed passed, $failed failed"
[ "$skipped" -gt 0 ] && summary="$summary, $skipped skipped"
echo "$summary" > .tmp/test-summary
echo "$summary"
exit "$status"
