#!/usr/bin/env bash
# Installs Prometheus from the distribution's packages (run as root; idempotent) for
# `fleetserve prometheus` and tests/test_metrics.py, which start their own Prometheus
# with their own config and data directory. Debian's package may also enable a system
# service on port 9090; the tests do not use it (where policy-rc.d forbids starting
# services, as in containers, it is not started at all).
set -euo pipefail
if command -v prometheus >/dev/null; then
  echo "prometheus ready: $(prometheus --version 2>&1 | head -1)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "setup-prometheus.sh: needs root to install the prometheus package (apt-get install prometheus)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus
echo "prometheus ready: $(prometheus --version 2>&1 | head -1)"
