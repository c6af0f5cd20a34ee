#!/usr/bin/env bash
# Installs the Debian packages listed in test/debian-packages.txt that are missing.
# Runs as root (CI) or through sudo; does nothing when everything is already there.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mapfile -t wanted < <(grep -v -E '^\s*(#|$)' "$here/debian-packages.txt")
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "tapkit tests: installing Debian packages: ${missing[*]}" >&2
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
# Another apt (an unattended upgrade, a parallel job) may hold the lock: wait for it.
apt_wait=(-o DPkg::Lock::Timeout=600)
"${sudo[@]}" apt-get "${apt_wait[@]}" update -qq
"${sudo[@]}" apt-get "${apt_wait[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
