#!/usr/bin/env bash
# By hand only (issue #9; no test runs it): the pieces of a 32-bit PVH domU for the Xen lab, so
# that a real Linux blkfront negotiates protocol=x86_32-abi with tapkit. Debian's i386
# 686-pae kernel has CONFIG_XEN_PVH=y and xen-blkfront as a module (XEN_PV needs x86_64).
# The i386 packages come through a private APT configuration in OUT_DIR/apt: the host's
# dpkg architectures are not changed.
#
#   test/xenlab/guest32/build32.sh OUT_DIR
# Produces OUT_DIR/vmlinuz32 and OUT_DIR/domu32.cpio.gz (busybox-static:i386, xen-blkfront,
# and the lab's own domu-init.sh as /init).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "${1:?usage: build32.sh OUT_DIR}" && cd "$1" && pwd)
apt=$out/apt
mkdir -p "$apt"/{lists/partial,cache/archives/partial,etc/sources.list.d,etc/preferences.d} "$out/debs"
key=/usr/share/keyrings/debian-archive-keyring.gpg
cat > "$apt/etc/sources.list" <<SRC
deb [arch=i386 signed-by=$key] http://deb.debian.org/debian bookworm main
deb [arch=i386 signed-by=$key] http://deb.debian.org/debian-security bookworm-security main
deb [arch=i386 signed-by=$key] http://deb.debian.org/debian bookworm-updates main
SRC
opts=(-o "Dir::Etc=$apt/etc" -o "Dir::Etc::sourcelist=$apt/etc/sources.list" -o "Dir::Etc::sourceparts=$apt/etc/sources.list.d"
  -o "Dir::State=$apt" -o "Dir::State::Lists=$apt/lists" -o Dir::State::status=/dev/null -o "Dir::Cache=$apt/cache"
  -o APT::Architecture=i386 -o APT::Architectures::=i386 -o Debug::NoLocking=1)
# A security index caught mid-sync fails; the main suite is enough to go on.
apt-get "${opts[@]}" update -qq || echo "build32: apt-get update reported errors (see above); going on" >&2
# The newest 686-pae ABI the index knows (the lab's amd64 kernel may be a little newer).
KVER=$(apt-cache "${opts[@]}" search --names-only '^linux-image-6\.1\.0-[0-9]+-686-pae$' | cut -d' ' -f1 | sed 's/^linux-image-//' | sort -V | tail -1)
[ -n "$KVER" ] || { echo "build32: no linux-image-*-686-pae in the i386 index" >&2; exit 1; }
( cd "$out/debs" && for p in "linux-image-$KVER" busybox-static; do
    ls "${p}"_*.deb >/dev/null 2>&1 || apt-get "${opts[@]}" download -qq "$p:i386"
  done )
x=$out/x; rm -rf "$x" && mkdir -p "$x"
for d in "$out"/debs/*.deb; do dpkg-deb -x "$d" "$x"; done
grep -E '^CONFIG_(XEN|XEN_PVH|X86_PAE|XEN_BLKDEV_FRONTEND)=' "$x/boot/config-$KVER" >&2
cp "$x/boot/vmlinuz-$KVER" "$out/vmlinuz32"

root=$out/domu32-root
rm -rf "$root" && mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,run,tmp,root,usr/bin,usr/sbin}
cp "$x/bin/busybox" "$root/bin/busybox"
# busybox:i386 runs on the amd64 host, so --list works here.
for app in $("$root/bin/busybox" --list); do [ -e "$root/bin/$app" ] || ln -s busybox "$root/bin/$app"; done
m=lib/modules/$KVER
mkdir -p "$root/$m/kernel/drivers/block"
cp "$x/$m/kernel/drivers/block/xen-blkfront.ko" "$root/$m/kernel/drivers/block/"
cp "$x/$m"/modules.{order,builtin,builtin.modinfo} "$root/$m/" 2>/dev/null || true
depmod -b "$root" "$KVER"
cp "$here/../domu-init.sh" "$root/init" && chmod +x "$root/init"
( cd "$root" && find . | cpio -o -H newc --quiet | gzip -6 ) > "$out/domu32.cpio.gz"
echo "build32: $KVER -> $out/vmlinuz32, $out/domu32.cpio.gz" >&2
