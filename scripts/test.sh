#!/usr/bin/env bash
# Sets up everything the test suite needs, then runs it (CPU only). The GPU tests
# (tests/test_gpu.py, marker `gpu`) run on a GPU machine with the stack installed
# or staged (benchmarks/gpu/README.md: `source benchmarks/gpu/run_served.sh --env-only`):
#   FLEETSERVE_GPU_RESULTS=DIR python3 -m pytest -m gpu -v -rs
# Without a CUDA GPU / a CUDA build of vLLM they are skipped with the reason.
#   bash scripts/test.sh               # whole CPU suite (as root: emulated hosts too)
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
# A later -m given by the caller replaces this one (pytest keeps the last).
exec .venv/bin/python -m pytest -m "not gpu and not soak" "$@"
