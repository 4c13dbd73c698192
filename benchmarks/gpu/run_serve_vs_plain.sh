#!/bin/bash
# One phase of benchmarks/gpu/serve_vs_plain.py on a device machine with the staged stack
# (benchmarks/gpu/README.md says how to stage it). Run the phases back to back on one machine:
#   bash benchmarks/gpu/run_serve_vs_plain.sh serve  [--set KEY=VALUE ...]
#   bash benchmarks/gpu/run_serve_vs_plain.sh plain  [--set KEY=VALUE ...]
#   bash benchmarks/gpu/run_serve_vs_plain.sh stock|direct [--env KEY=VALUE] [--set ...]
# RUN_LABEL=NAME names the run (and its $OUT/NAME.json) when one phase runs with several settings.
# MODEL_SIZE=32b (default) or 7b: the Qwen2.5-VL config + tokenizer of that size (no weights:
# load_format dummy), made once per machine; the 7B is served under its own name.
set -uo pipefail
phase=$1; shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu/run_served.sh --env-only
SIZE=${MODEL_SIZE:-32b}
case $SIZE in 7b|32b) ;; *) echo "MODEL_SIZE=$SIZE: 7b or 32b" >&2; exit 2;; esac
M=/tmp/models/qwen2_5_vl_$SIZE
[ -f $M/config.json ] || python3 -m cluster.cli make-model --arch qwen2_5_vl --size $SIZE --out $M >/dev/null
NAME=(); [ "$SIZE" = 32b ] || NAME=(--set model.served_name=Qwen2.5-VL-${SIZE^^}-Instruct)
# Both endpoints take the same API key (the deployment file requires one beyond loopback);
# vllm bench serve sends OPENAI_API_KEY as a Bearer token.
KEYS=$HOME/.config/fleetserve/api-keys
[ -s $KEYS ] || { mkdir -p $(dirname $KEYS); python3 -c 'import secrets; print(secrets.token_urlsafe(24))' > $KEYS; chmod 600 $KEYS; }
export OPENAI_API_KEY=$(head -1 $KEYS)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout -k 10 $(( ${DEADLINE_S:-540} + 150 )) python3 benchmarks/gpu/serve_vs_plain.py run \
  --phase "$phase" --label "${RUN_LABEL:-$phase}" --model-dir $M --out "$OUT/${RUN_LABEL:-$phase}.json" \
  --deadline-s ${DEADLINE_S:-540} \
  --set model.load_format=dummy --set accelerator_type=null "${NAME[@]}" "$@"
