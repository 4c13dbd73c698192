#!/usr/bin/env bash
# Installs what the emulated-host cluster tests need (run as root; idempotent):
# sshd + ssh-keygen, iproute2 (ip netns, bridges, veth), util-linux (unshare
# --pid --mount-proc), procps; rsync for the benchmark's `ray up`. No daemons are started here; the tests start
# one sshd per emulated host (tests/hosts/emulation.py) and stop it again.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "setup-host-emulation.sh: needs root (emulated hosts use network/PID namespaces)" >&2
  exit 1
fi
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v ip >/dev/null || need+=(iproute2)
command -v unshare >/dev/null || need+=(util-linux)
command -v ps >/dev/null || need+=(procps)
# only benchmarks/bench_bringup.py needs it (Ray's `ray up` copies its bootstrap files with rsync)
command -v rsync >/dev/null || need+=(rsync)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# The Debian package may start an sshd in the root namespace on install; the
# tests never use it (each emulated host has its own), so leave it as it is.
modprobe bridge 2>/dev/null || true
modprobe veth 2>/dev/null || true
unshare --pid --fork --mount-proc true
ip netns list >/dev/null
echo "host emulation ready: $(/usr/sbin/sshd -V 2>&1 | head -1), $(ip -V)"
