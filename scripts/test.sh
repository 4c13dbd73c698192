#!/usr/bin/env bash
# Sets up everything the test suite needs, then runs it (CPU only). The GPU tests
# (tests/test_gpu.py, marker `gpu`) run on a GPU machine with the stack installed
# or staged (benchmarks/gpu/README.md: `source benchmarks/gpu/run_served.sh --env-only`):
#   FLEETSERVE_GPU_RESULTS=DIR python3 -m pytest -m gpu -v -rs
# Without a CUDA GPU / a CUDA build of vLLM they are skipped with the reason.
#   bash scripts/test.sh               # whole CPU suite (as root: emulated hosts too, beside the rest)
#   bash scripts/test.sh -m "not slow" # fast unit tests only
#   bash scripts/test.sh -m soak       # opt-in: the scaling/fault soak (tests/test_scaling.py) and, as
#                                      # root, the direct path on emulated hosts (tests/test_direct_path_hosts.py)
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
# As root with only these options: two streams. The emulated-host modules (marker `hosts`: SSH,
# `ray start`, timeouts) leave a core idle about half the time (a serial run kept the 2 cores 59%
# busy), so they run beside the rest, one at a time (they share the hosts' namespaces); their
# output follows the main stream's. Any other argument (-m, -k, paths, --basetemp, --junitxml,
# cache options, an option's value as a separate word) runs one stream as before.
split=
if [ "$(id -u)" = 0 ]; then split=yes; fi
for arg in "$@"; do
  case $arg in -v|-vv|-vvv|-q|-qq|-s|-x|-r?*|--durations=*|--tb=*|--maxfail=*|--timeout=*) ;; *) split=;; esac
done
if [ -z "$split" ]; then
  # A later -m given by the caller replaces this one (pytest keeps the last).
  exec "${pytest[@]}" -m "not gpu and not soak" "$@"
fi
hosts_log=$(mktemp /tmp/fleetserve-hosts-tests.XXXXXX)
# Background jobs start with SIGINT ignored: give it back, so that Ctrl-C (which reaches the whole
# process group) ends each pytest through its fixtures' teardown, as in a single run.
(trap - INT; exec "${pytest[@]}" -p no:cacheprovider -m "hosts and not gpu and not soak" "$@") \
  > "$hosts_log" 2>&1 &
hosts_pid=$!
(trap - INT; exec "${pytest[@]}" -m "not hosts and not gpu and not soak" "$@") &
main_pid=$!
# Ctrl-C has reached both already; SIGTERM is passed on, as a single run's pytest would get it.
trap 'wait $main_pid $hosts_pid || true; rm -f "$hosts_log"; exit 130' INT
trap 'kill -TERM $main_pid $hosts_pid 2>/dev/null; wait $main_pid $hosts_pid || true; rm -f "$hosts_log"; exit 143' TERM
rc=0
wait $main_pid || rc=$?
hosts_rc=0
wait $hosts_pid || hosts_rc=$?
trap - INT TERM
echo; echo "=========================== emulated-host modules (marker hosts) ==========================="
cat "$hosts_log"; rm -f "$hosts_log"
echo "main stream exit $rc, emulated-host stream exit $hosts_rc"
# pytest's 5 ("no tests collected") is no failure for one stream.
if [ $rc = 5 ]; then rc=0; fi
if [ $hosts_rc = 5 ]; then hosts_rc=0; fi
exit $(( rc > hosts_rc ? rc : hosts_rc ))
