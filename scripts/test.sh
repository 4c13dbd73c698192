#!/usr/bin/env bash
# Sets up everything the test suite needs, then runs it (CPU only). The GPU tests
# (tests/test_gpu.py, marker `gpu`) run on a GPU machine with the stack installed
# or staged (benchmarks/gpu/README.md: `source benchmarks/gpu/run_served.sh --env-only`):
#   FLEETSERVE_GPU_RESULTS=DIR python3 -m pytest -m gpu -v -rs
# Without a CUDA GPU / a CUDA build of vLLM they are skipped with the reason.
#   bash scripts/test.sh               # whole CPU suite (as root: emulated hosts too, beside the rest)
#   bash scripts/test.sh -m "not slow" # fast unit tests only
#   bash scripts/test.sh -m soak       # the long scaling/fault soak (tests/test_scaling.py)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
# Emulated SSH hosts (network + PID namespaces, sshd) need root and a few packages.
if [ "$(id -u)" = 0 ] && [ -f scripts/setup-host-emulation.sh ]; then
  bash scripts/setup-host-emulation.sh
fi
# Prometheus (Debian's package) for the scrape-through-service-discovery test; without
# root and without the package that test is skipped.
if [ "$(id -u)" = 0 ]; then
  bash scripts/setup-prometheus.sh
fi
export PYTHONUNBUFFERED=1
pytest=(.venv/bin/python -m pytest)
# Options only (no -m/-k/paths) and emulated hosts available: two streams. The emulated-host
# modules (marker `hosts`: SSH, `ray start`, timeouts) leave a core idle about half the time
# (a serial run kept the 2 cores 59% busy), so they run beside the rest, one at a time (they
# share the hosts' namespaces); their output follows the main stream's.
split=$([ "$(id -u)" = 0 ] && echo yes)
for arg in "$@"; do
  case $arg in -m|-m*|-k|-k*|--deselect*|[!-]*) split=;; esac
done
if [ -z "$split" ]; then
  # A later -m given by the caller replaces this one (pytest keeps the last).
  exec "${pytest[@]}" -m "not gpu and not soak" "$@"
fi
hosts_log=$(mktemp /tmp/fleetserve-hosts-tests.XXXXXX)
"${pytest[@]}" -p no:cacheprovider -m "hosts and not gpu and not soak" "$@" > "$hosts_log" 2>&1 &
hosts_pid=$!
trap 'kill $hosts_pid 2>/dev/null' INT TERM
rc=0
"${pytest[@]}" -m "not hosts and not gpu and not soak" "$@" || rc=$?
hosts_rc=0
wait $hosts_pid || hosts_rc=$?
echo; echo "=========================== emulated-host modules (marker hosts) ==========================="
cat "$hosts_log"; rm -f "$hosts_log"
echo "main stream exit $rc, emulated-host stream exit $hosts_rc"
# pytest's 5 ("no tests collected") is no failure for one stream.
[ $rc = 5 ] && rc=0; [ $hosts_rc = 5 ] && hosts_rc=0
exit $(( rc > hosts_rc ? rc : hosts_rc ))
