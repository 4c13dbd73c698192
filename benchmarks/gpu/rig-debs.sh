#!/bin/bash
# Here (a Debian machine with apt and these tools installed), once: fetch the .deb files of
# the tools the two-host rig needs on the GPU machines, which have none of them installed --
# iproute2 (ip netns, bridge, veth), openssh-server (sshd), openssh-client (ssh-keygen),
# procps (pgrep, used by `fleetserve down`/`up` to check Ray is gone) -- plus the packages of
# every shared library those binaries load, except libc6 (the machine's own C library is used).
# The libraries are found by asking this machine's loader (ldd) and dpkg which package owns
# each, so the set matches the binaries exactly. Result: .rig-debs/*.deb (git-ignored, a few
# MiB; plus paramiko's wheels in .rig-debs/wheels), carried in a device call and unpacked
# there by benchmarks/gpu/rig-tools.sh, outside /.
#   bash benchmarks/gpu/rig-debs.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
TOOLS="/usr/sbin/sshd /usr/bin/ssh-keygen /usr/bin/ip /usr/bin/pgrep /usr/bin/ps"
PACKAGES="openssh-server openssh-client openssh-sftp-server iproute2 procps"
owner() {  # the package owning a file; dpkg records merged-/usr files under /lib or /bin too
  local f=$1
  dpkg -S "$f" 2>/dev/null | head -1 | cut -d: -f1 && return
  dpkg -S "${f#/usr}" 2>/dev/null | head -1 | cut -d: -f1
}
libs=()
for tool in $TOOLS; do
  [ -x "$tool" ] || { echo "rig-debs.sh: $tool missing here (apt-get install $PACKAGES first)" >&2; exit 1; }
  while read -r lib; do libs+=("$(readlink -f "$lib")"); done < <(ldd "$tool" | awk '/=> \//{print $3}')
done
pkgs=$PACKAGES
for lib in $(printf '%s\n' "${libs[@]}" | sort -u); do
  p=$(owner "$lib" || true)
  [ -n "$p" ] || { echo "rig-debs.sh: no package owns $lib" >&2; exit 1; }
  case "$p" in libc6) ;; *) pkgs="$pkgs $p";; esac
done
pkgs=$(printf '%s\n' $pkgs | sort -u | tr '\n' ' ')
rm -rf .rig-debs && mkdir -p .rig-debs
(cd .rig-debs && apt-get download $pkgs >/dev/null)
echo "$pkgs" > .rig-debs/PACKAGES
# fleetserve's own SSH library: the serving-stack bundle (../shared/gpu) holds vLLM's and Ray's
# dependencies, not paramiko's closure; the GPU image's Python is CPython 3.12.
${PIP:-.venv/bin/pip} download -q -d .rig-debs/wheels --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_34_x86_64 'paramiko>=3.4' >/dev/null
echo "$(ls .rig-debs/*.deb | wc -l) packages and $(ls .rig-debs/wheels | wc -l) wheels in .rig-debs ($(du -sh .rig-debs | cut -f1)): $pkgs $(ls .rig-debs/wheels)"
