#!/usr/bin/env bash
# The backend-type lab on its own (docs/xen-backends.md): installs the Debian packages the
# tests need, builds tapkit, and boots Xen in QEMU with test/xenlab/scenario-backends.sh
# (vbd, qdisk through device_model_override, vbd3 hot-plugged; data by grant copy).
set -uo pipefail
cd "$(dirname "$0")/../.."
bash test/setup-system.sh || exit 1
npm run build --silent || exit 1
exec npx ava --config test/xenlab/ava.backends.config.mjs "$@"
