#!/usr/bin/env bash
# Builds the Xen lab (docs/xen-lab.md): Xen 4.17, a PV dom0 and a PV domU on Debian's
# kernel, each with a busybox initramfs. Everything comes from Debian's archive through
# `apt-get download` and is unpacked with `dpkg-deb -x` into the lab directory: nothing is
# installed on the host and the host's /boot is never touched. No root is needed beyond
# what apt-get download needs to write its files.
#
#   test/xenlab/build.sh [LAB_DIR]        (default: .tmp/xenlab in the repository)
#
# Produces in LAB_DIR: xen (the hypervisor, multiboot ELF), vmlinuz, dom0.cpio.gz,
# domu.cpio.gz. A second run with the same inputs does nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
lab=${1:-$repo/.tmp/xenlab}
mkdir -p "$lab"
lab=$(cd "$lab" && pwd)

XEN_PACKAGES=(xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common xenstore-utils
  libxencall1 libxenevtchn1 libxenforeignmemory1 libxengnttab1 libxenmisc4.17 libxenstore4
  libxentoollog1 libxentoolcore1 libxendevicemodel1 libxenhypfs1 libyajl2 busybox-static)
# The kernel Debian's linux-image-amd64 points at today.
KVER=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: linux-image-\([0-9].*-amd64\)$/\1/p' | head -1)
[ -n "$KVER" ] || { echo "xenlab: cannot tell which kernel linux-image-amd64 depends on (apt-get update?)" >&2; exit 1; }

# Everything the images are made of; a change rebuilds them.
stamp=$( (printf '%s\n' "$KVER" "${XEN_PACKAGES[@]}"; cat "$here"/build.sh "$here"/dom0-init.sh "$here"/domu-init.sh) | sha256sum | cut -c1-16)
if [ -f "$lab/stamp" ] && [ "$(cat "$lab/stamp")" = "$stamp" ] && [ -f "$lab/dom0.cpio.gz" ]; then
  exit 0
fi

log() { echo "xenlab build: $*" >&2; }

# ---- 1. Debian packages, unpacked ---------------------------------------------------
mkdir -p "$lab/debs"
( cd "$lab/debs" && for p in "${XEN_PACKAGES[@]}" "linux-image-$KVER"; do
    ls "${p}"_*.deb >/dev/null 2>&1 || { log "downloading $p"; apt-get download -qq "$p" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true; }
    ls "${p}"_*.deb >/dev/null 2>&1 || { echo "xenlab: apt-get download $p failed" >&2; exit 1; }
  done )
rm -rf "$lab/x" && mkdir -p "$lab/x"
for d in "$lab"/debs/*.deb; do dpkg-deb -x "$d" "$lab/x"; done
x=$lab/x
XLIB="$x/usr/lib/x86_64-linux-gnu:$x/lib/x86_64-linux-gnu:$x/usr/lib/xen-4.17/lib"

gunzip -c "$x/boot/xen-4.17-amd64.gz" > "$lab/xen"
cp "$x/boot/vmlinuz-$KVER" "$lab/vmlinuz"

# ---- helpers to fill a root file system -------------------------------------------
# copy_bin ROOT SRC [DEST]: a program and every shared library it needs (found with ldd,
# the unpacked packages first, then the host's, which is where glibc comes from).
copy_libs() {
  local root=$1 bin=$2 lib dest
  for lib in $(LD_LIBRARY_PATH=$XLIB ldd "$bin" 2>/dev/null | grep -o '/[^ ]*' | sort -u); do
    dest=${lib#"$x"}
    [ -e "$root$dest" ] && continue
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$lib" "$root$dest"
  done
}
copy_bin() {
  local root=$1 src=$2 dest=${3:-$2}
  dest=${dest#"$x"}
  mkdir -p "$root$(dirname "$dest")"
  cp -L "$src" "$root$dest"
  copy_libs "$root" "$src"
}
# Copies the modules named and what they depend on (modules.dep of the unpacked kernel).
copy_modules() {
  local root=$1; shift
  local m f
  depmod -b "$x" "$KVER"
  for m in "$@"; do
    for f in $(modprobe -d "$x" -S "$KVER" --show-depends "$m" | awk '$1=="insmod"{print $2}'); do
      mkdir -p "$root$(dirname "${f#"$x"}")"
      cp "$f" "$root${f#"$x"}"
    done
  done
  mkdir -p "$root/lib/modules/$KVER"
  cp "$x/lib/modules/$KVER"/modules.{order,builtin,builtin.modinfo} "$root/lib/modules/$KVER/" 2>/dev/null || true
  depmod -b "$root" "$KVER"
}
base_root() {
  local root=$1
  rm -rf "$root" && mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,run,tmp,var/log,var/run,root,mnt,usr/bin,usr/sbin}
  cp "$x/bin/busybox" "$root/bin/busybox"
  for app in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$app" ] || ln -s busybox "$root/bin/$app"
  done
}
pack() { ( cd "$1" && find . | cpio -o -H newc --quiet | gzip -6 ) > "$2"; }

# ---- 2. domU: blkfront and the guest-side check -----------------------------------
log "domU root"
du=$lab/domu-root
base_root "$du"
copy_modules "$du" xen-blkfront
for b in /sbin/mkfs.ext4 /sbin/fsck.ext4 /sbin/mke2fs /sbin/e2fsck; do copy_bin "$du" "$b"; done
cp "$here/domu-init.sh" "$du/init" && chmod +x "$du/init"
pack "$du" "$lab/domu.cpio.gz"

# ---- 3. dom0: the toolstack, Node's libraries, the domU's kernel and initramfs ------
log "dom0 root"
d0=$lab/dom0-root
base_root "$d0"
copy_modules "$d0" xen-evtchn xen-privcmd xenfs xen-gntdev xen-gntalloc xen-blkback loop \
  9p 9pnet_virtio virtio_pci fuse
for b in usr/sbin/xl usr/lib/xen-4.17/bin/xenstored usr/lib/xen-4.17/bin/xenconsoled \
  usr/lib/xen-4.17/bin/xen-init-dom0 usr/lib/xen-4.17/bin/libxl-save-helper \
  usr/lib/xen-4.17/bin/xenconsole usr/bin/xenstore-read usr/bin/xenstore-write \
  usr/bin/xenstore-ls usr/bin/xenstore-rm usr/bin/xenstore-exists usr/bin/xenstore-watch \
  usr/bin/xenstore-list usr/bin/xenstore-chmod; do
  [ -e "$x/$b" ] && copy_bin "$d0" "$x/$b" "/$b"
done
# xl is a wrapper in usr/sbin; the real program lives under usr/lib/xen-4.17/bin.
copy_bin "$d0" "$x/usr/lib/xen-4.17/bin/xl" /usr/sbin/xl
# The hotplug scripts run under bash and need flock and coreutils' stat; xl dlopens
# libgcc_s for pthread_cancel. The Xen libraries tapkit binds through ffi-napi come along.
for b in /bin/bash /usr/bin/flock /usr/bin/stat /usr/sbin/losetup /sbin/mkfs.ext4 /sbin/e2fsck /sbin/fsck.ext4; do copy_bin "$d0" "$b"; done
cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 "$d0/lib/x86_64-linux-gnu/"
mkdir -p "$d0/usr/lib/x86_64-linux-gnu"
for l in libxengnttab.so.1 libxenevtchn.so.1 libxenstore.so.4; do
  cp -L "$x/usr/lib/x86_64-linux-gnu/$l" "$d0/usr/lib/x86_64-linux-gnu/$l"
  copy_libs "$d0" "$x/usr/lib/x86_64-linux-gnu/$l"
done
# Node itself is read over 9p (it is large); its libraries go in the image.
copy_libs "$d0" "$(readlink -f "$(command -v node)")"
mkdir -p "$d0/etc/xen" "$d0/var/lib/xen" "$d0/var/log/xen/console" "$d0/var/run/xen" "$d0/run/xen" "$d0/boot"
cp -r "$x/etc/xen/scripts" "$d0/etc/xen/"
cp "$x/etc/xen/xl.conf" "$d0/etc/xen/"
printf '#!/bin/sh\nexit 0\n' > "$d0/etc/xen/scripts/block-noop" && chmod +x "$d0/etc/xen/scripts/block-noop"
cp "$lab/vmlinuz" "$d0/boot/vmlinuz"
cp "$lab/domu.cpio.gz" "$d0/boot/domu.cpio.gz"
echo "root:x:0:0:root:/root:/bin/sh" > "$d0/etc/passwd"
echo "root:x:0:" > "$d0/etc/group"
mkdir -p "$d0/lib64" && [ -e "$d0/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$d0/lib64/"
echo "$KVER" > "$d0/etc/kver"
cp "$here/dom0-init.sh" "$d0/init" && chmod +x "$d0/init"
pack "$d0" "$lab/dom0.cpio.gz"

echo "$stamp" > "$lab/stamp"
log "done: $(du -h "$lab/dom0.cpio.gz" | cut -f1) dom0, $(du -h "$lab/domu.cpio.gz" | cut -f1) domU, kernel $KVER"
