/**
 * Backend types: where in XenStore a blkif backend finds its devices. The ring protocol is
 * the same for all three; what differs is who writes the nodes and what `params` holds.
 *
 *  - `vbd`: the kernel blkback's directory (`xl` with `backendtype=phy`; blkback must not be
 *    loaded); `params` is a tapkit spec, or whatever the hotplug script left there.
 *  - `qdisk`: QEMU's directory (`backendtype=qdisk`); libxl writes `params` as
 *    `FORMAT:PATH` with QEMU's format names (`aio` for raw, `vhd`, `qcow2`, ...) and starts a
 *    "device model" per guest (`device_model_override` → `tapkit xen qemu-stub`).
 *  - `vbd3`: XenServer's tapdisk3 directory; `xl` cannot make these, `tapkit xen attach`
 *    writes the nodes to a running guest, whose blkfront hot-plugs the disk.
 *
 * The frontend's directory is `device/vbd/DEVID` for all three (blkfront follows `backend`).
 */
export const BACKEND_TYPES = ['vbd', 'qdisk', 'vbd3'] as const;
export type BackendType = (typeof BACKEND_TYPES)[number];

export function isBackendType(value: string): value is BackendType {
  return (BACKEND_TYPES as readonly string[]).includes(value);
}

/** `/local/domain/0/backend/TYPE`: the directory a backend of this type watches. */
export function backendRoot(type: BackendType = 'vbd'): string {
  return `/local/domain/0/backend/${type}`;
}

/** QEMU's block driver names (as libxl writes them into a qdisk's params) → tapkit formats. */
const QEMU_FORMATS: Record<string, string | null> = {
  aio: 'raw',
  raw: 'raw',
  file: 'raw',
  vhd: 'vhd',
  vpc: 'vhd',
  qcow2: 'qcow2',
  qcow: null,
  qed: null,
};

/**
 * The tapkit spec for a backend's `params`. For qdisk, libxl's `FORMAT:PATH` is read the
 * way QEMU reads it (`aio:/x.img` is the raw file /x.img); an empty path is an empty
 * drive (a CD-ROM without a medium), which tapkit refuses. Other types take `params` as a
 * tapkit spec.
 */
export function specFromParams(type: BackendType, params: string): string {
  if (type !== 'qdisk') return params;
  const colon = params.indexOf(':');
  if (colon < 0) return params;
  const format = params.slice(0, colon);
  const path = params.slice(colon + 1);
  if (!(format in QEMU_FORMATS)) return params;
  const tapkit = QEMU_FORMATS[format];
  if (tapkit === null) throw new Error(`qdisk params '${params}': tapkit does not read QEMU's '${format}' format`);
  if (path === '') throw new Error(`qdisk params '${params}' names no file (an empty drive)`);
  return `${tapkit}:${path}`;
}
