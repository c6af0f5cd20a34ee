/**
 * The `nbd` export kind of `tapkit daemon`: `nbd:SOCKET` / `nbd:unix:SOCKET` (a Unix socket)
 * or `nbd:HOST:PORT` / `nbd:tcp:HOST:PORT` (TCP; port 0 picks a free one). Each export is
 * its own NbdServer serving the device's VBD as the default export (name ""), so a client
 * reaches it with the URI the daemon reports as the export's target.
 *
 * Importing this module registers the kind; `tapkit daemon` imports it.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { registerExportKind } from '../daemon/exports';
import { BlockError } from '../errors';
import { NbdServer } from './server';
import { parseListenTarget, tcpUri, unixUri } from './uri';

registerExportKind('nbd', async (vbd, argument, { deviceId, log }) => {
  let target;
  try {
    target = parseListenTarget(argument);
  } catch (e) {
    throw new BlockError('EINVAL', `nbd export: ${(e as Error).message}`);
  }
  // The daemon's working directory means nothing to whoever sent the request.
  if ('path' in target && !path.isAbsolute(argument.replace(/^unix:/, ''))) {
    throw new BlockError('EINVAL', `nbd export: the socket path '${argument}' must be absolute`);
  }
  const server = new NbdServer({
    exports: [{ name: '', vbd, description: `tapkit device ${deviceId}` }],
    log: (message) => log.warn(message, { export: 'nbd' }),
  });
  let uri: string;
  try {
    const address = await server.listen(target);
    uri = 'path' in target ? unixUri('', target.path) : tcpUri('', target.host, typeof address === 'string' ? target.port : address.port);
  } catch (e) {
    await server.close();
    const code = (e as NodeJS.ErrnoException).code;
    const errno = code === 'EACCES' ? 'EACCES' : code === 'ENOENT' ? 'ENOENT' : 'EBUSY';
    throw new BlockError(errno, `nbd export cannot listen on '${argument}': ${(e as Error).message}`);
  }
  return {
    kind: 'nbd',
    target: uri,
    stats: () => server.stats(),
    async close() {
      await server.close();
      if ('path' in target) fs.rmSync(target.path, { force: true });
    },
  };
});
