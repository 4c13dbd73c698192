#!/usr/bin/env bash
# fleetserve's two data paths against plain vLLM on this machine's CPU, one after the other,
# with benchmarks/gpu/serve_vs_plain.py (the GPU comparison's script, same client and report):
#   plain         vllm's API server with the engine flags and env of deployments/tiny.yaml
#   serve         fleetserve serve deployments/tiny.yaml (proxy -> FleetIngress -> FleetLLMServer)
#   serve_direct  the same with --set data_path=direct (HAProxy -> the replica's own vLLM app)
#   direct        ray.serve.llm's build_openai_app with direct streaming + HAProxy (no fleetserve class)
# The tiny model's engine is cheap, so what the path costs per request and per token shows more
# than on a GPU; the client (vllm bench serve) shares the cores with the server. Writes
# benchmarks/results/serve_vs_plain_tiny_cpu.{json,png}.
#   bash benchmarks/serve_vs_plain_cpu.sh          # LOADS=random_c1,random_c16 to choose loads
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=$(mktemp -d /tmp/serve-vs-plain-cpu.XXXXXX)
M=${FLEETSERVE_TINY_MODEL:-$HOME/.cache/fleetserve/models/tiny-qwen2_5_vl}
[ -f "$M/config.json" ] || $PY -m cluster.cli make-model --arch qwen2_5_vl --size tiny --out "$M" >/dev/null
# The direct path needs a key even on loopback; every phase takes the same one.
(umask 077; $PY -c 'import secrets; print(secrets.token_urlsafe(24))' > "$OUT/api-keys")
export OPENAI_API_KEY=$(head -1 "$OUT/api-keys")
LOADS=${LOADS:-random_c1,random_c16,random-mm_c16}
COMMIT=$(git rev-parse HEAD)
common=(--file "$PWD/deployments/tiny.yaml" --model-dir "$M" --loads "$LOADS" --deadline-s "${DEADLINE_S:-600}"
        --set "model.source=$M" --set "endpoint.api_keys_file=$OUT/api-keys")
run() {  # LABEL PHASE [ARGS...]
  local label=$1 phase=$2; shift 2
  echo "== $label"
  FLEETSERVE_COMMIT=$COMMIT $PY benchmarks/gpu/serve_vs_plain.py run --phase "$phase" --label "$label" \
    --out "$OUT/$label.json" "${common[@]}" "$@"
}
run plain plain
run serve serve
run serve_direct serve --set data_path=direct
# The settings fleetserve's direct path gives its cluster (cluster/serving/direct.py CLUSTER_ENV).
run direct direct --env RAY_SERVE_THROUGHPUT_OPTIMIZED=1
$PY benchmarks/gpu/serve_vs_plain.py report "$OUT"/{plain,serve,serve_direct,direct}.json \
  --name serve_vs_plain_tiny_cpu --note "${NOTE:-}"
echo "runs and server logs: $OUT"
