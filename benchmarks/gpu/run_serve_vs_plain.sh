#!/bin/bash
# One phase of benchmarks/gpu/serve_vs_plain.py on a device machine with the staged stack
# (benchmarks/gpu/README.md says how to stage it). Run the phases back to back on one machine:
#   bash benchmarks/gpu/run_serve_vs_plain.sh serve  [--set KEY=VALUE ...]
#   bash benchmarks/gpu/run_serve_vs_plain.sh plain  [--set KEY=VALUE ...]
# The Qwen2.5-VL-32B config + tokenizer (no weights: load_format dummy) are made once per machine.
set -uo pipefail
phase=$1; shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu/run_served.sh --env-only
M=/tmp/models/qwen2_5_vl_32b
[ -f $M/config.json ] || python3 -m cluster.cli make-model --arch qwen2_5_vl --size 32b --out $M >/dev/null
# Both endpoints take the same API key (the deployment file requires one beyond loopback);
# vllm bench serve sends OPENAI_API_KEY as a Bearer token.
KEYS=$HOME/.config/fleetserve/api-keys
[ -s $KEYS ] || { mkdir -p $(dirname $KEYS); python3 -c 'import secrets; print(secrets.token_urlsafe(24))' > $KEYS; chmod 600 $KEYS; }
export OPENAI_API_KEY=$(head -1 $KEYS)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
FLEETSERVE_COMMIT=${FLEETSERVE_COMMIT:-unknown} timeout -k 10 580 python3 benchmarks/gpu/serve_vs_plain.py run \
  --phase "$phase" --model-dir $M --out "$OUT/$phase.json" --deadline-s ${DEADLINE_S:-540} \
  --set model.load_format=dummy --set accelerator_type=null "$@"
