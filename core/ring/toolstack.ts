/**
 * The toolstack's part of `xl block-attach` / `block-detach` (XENSIM.md "Devices and the
 * toolstack"): the backend and frontend nodes of one vbd, written in one transaction.
 * On a real dom0 (a store with setPermissions) the two directories also get libxl's
 * permissions: the frontend's owned by the guest and readable by dom0, the backend's
 * owned by dom0 and readable by the guest, so the guest's blkfront can hot-plug it.
 */
import { inTransaction, type XenStore } from './platform';
import { backendRoot, type BackendType } from './backend-types';
import { XenbusState } from './device';

export interface AttachRequest {
  domid: number;
  devid: number;
  spec: string;
  readOnly?: boolean;
  /** The backend directory (default `vbd`; `vbd3` for XenServer's, which xl cannot make). */
  type?: BackendType;
}

export function backendPath(domid: number, devid: number, type: BackendType = 'vbd'): string {
  return `${backendRoot(type)}/${domid}/${devid}`;
}

export function frontendPath(domid: number, devid: number): string {
  return `/local/domain/${domid}/device/vbd/${devid}`;
}

/** xvd names for the usual virtual-device numbers (202<<8 | disk<<4 | part), else the number. */
function devName(devid: number): string {
  if (devid >> 8 === 202 && (devid & 15) === 0) return `xvd${String.fromCharCode(97 + ((devid >> 4) & 15))}`;
  return String(devid);
}

export async function attach(store: XenStore, r: AttachRequest): Promise<void> {
  if (!Number.isInteger(r.domid) || r.domid < 1 || r.domid > 0x7fef) throw new Error(`domain id ${r.domid} is not a guest domain`);
  if (!Number.isInteger(r.devid) || r.devid < 0) throw new Error(`device id ${r.devid} is not valid`);
  const be = backendPath(r.domid, r.devid, r.type);
  const fe = frontendPath(r.domid, r.devid);
  await inTransaction(store, async (tx) => {
    if ((await store.read(`${be}/state`, tx)) !== undefined) throw new Error(`vbd ${r.domid}/${r.devid} already exists`);
    const backend: Record<string, string> = {
      frontend: fe,
      'frontend-id': String(r.domid),
      online: '1',
      state: String(XenbusState.Initialising),
      params: r.spec,
      mode: r.readOnly ? 'r' : 'w',
      type: r.type === 'vbd3' ? 'vbd3' : 'tapkit',
      dev: devName(r.devid),
      removable: '0',
      bootable: '1',
      'device-type': 'disk',
    };
    const frontend: Record<string, string> = {
      backend: be,
      'backend-id': '0',
      state: String(XenbusState.Initialising),
      'virtual-device': String(r.devid),
      'device-type': 'disk',
    };
    if (store.setPermissions) {
      // As libxl does: make both directories and set their permissions first; the nodes
      // written below inherit them.
      await store.write(be, '', tx);
      await store.setPermissions(be, ['n0', `r${r.domid}`], tx);
      await store.write(fe, '', tx);
      await store.setPermissions(fe, [`n${r.domid}`, 'r0'], tx);
    }
    for (const [k, v] of Object.entries(backend)) await store.write(`${be}/${k}`, v, tx);
    for (const [k, v] of Object.entries(frontend)) await store.write(`${fe}/${k}`, v, tx);
  });
}

/**
 * Sets online=0, waits (bounded) for the backend to reach Closed, then removes both
 * directories. Resolves false when the backend did not close in time (the nodes are
 * removed anyway).
 */
export async function detach(store: XenStore, domid: number, devid: number, timeoutMs = 10_000, type: BackendType = 'vbd'): Promise<boolean> {
  const be = backendPath(domid, devid, type);
  const fe = frontendPath(domid, devid);
  if ((await store.read(`${be}/state`)) === undefined) throw new Error(`vbd ${domid}/${devid} does not exist`);
  let closed = false;
  let wake: () => void = () => undefined;
  const watch = await store.watch(`${be}/state`, () => wake());
  try {
    await store.write(`${be}/online`, '0');
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if ((await store.read(`${be}/state`)) === String(XenbusState.Closed)) {
        closed = true;
        break;
      }
      await new Promise<void>((resolve) => {
        wake = resolve;
        setTimeout(resolve, Math.min(200, Math.max(0, deadline - Date.now())));
      });
    }
  } finally {
    await watch.cancel();
  }
  await inTransaction(store, async (tx) => {
    await store.rm(be, tx);
    await store.rm(fe, tx);
  });
  return closed;
}
