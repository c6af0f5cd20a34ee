// Marks the CLI entry point executable after tsc has written it (tsc does not keep modes).
const fs = require('node:fs');
const path = require('node:path');
const cli = path.join(__dirname, '..', 'dist', 'core', 'cli', 'main.js');
if (fs.existsSync(cli)) fs.chmodSync(cli, 0o755);
