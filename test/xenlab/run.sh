#!/usr/bin/env bash
# The Xen lab on its own (`npm run test:xenlab`): installs the Debian packages the tests
# need, builds tapkit, and runs the lab test (which builds the lab images if needed and
# boots Xen in QEMU). See docs/xen-lab.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
bash test/setup-system.sh || exit 1
npm run build --silent || exit 1
exec npx ava --config test/xenlab/ava.config.mjs "$@"
