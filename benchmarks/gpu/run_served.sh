#!/bin/bash
# Served-endpoint GPU benchmark, stock vLLM vs FlagGems (benchmarks/gpu/served_compare.py),
# on a device machine with the staged stack (../shared/gpu/README.md).
#   FLEETSERVE_COMMIT=<sha> bash benchmarks/gpu/run_served.sh [phases] [deadline_s]
#     phases: comma list of stock,gems_compiled,gems_eager (default: all, in that order)
#   source benchmarks/gpu/run_served.sh --env-only   # just the stack's environment
# Needs the model dir .models/served_gpu/qwen2_5_vl_7b (carry it; made here with
# `python3 -m cluster.cli make-model`, or on the machine if missing).
# Results: $OUT/served.json (rewritten after each phase), $OUT/served.log, $OUT/ray_logs.txt (failures).

fleetserve_stack_env() {
  # The line of ../shared/gpu/unpack.txt (that folder does not travel to the device).
  [ -f /tmp/site/.ok ] || { mkdir -p /tmp/site && cat /tmp/stage/part.* | xz -dc -T0 | tar -x -C /tmp/site && touch /tmp/site/.ok; }
  export PYTHONPATH=$PWD:/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  # The bundle is unpacked from wheels with zipfile, which drops the exec bit of Ray's binaries.
  [ -x /tmp/site/ray/core/src/ray/gcs/gcs_server ] || find /tmp/site/ray/core -type f -exec chmod +x {} +
  export PYTHONUNBUFFERED=1 GEMS_VENDOR=nvidia
  # No network on the device: never let HF / usage stats wait on it.
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0
  # The vLLM plugin's entry point must be visible to importlib.metadata: a dist-info for fleetserve.
  if [ ! -d /tmp/site/fleetserve-0.1.0.dist-info ]; then
    mkdir -p /tmp/site/fleetserve-0.1.0.dist-info
    printf 'Metadata-Version: 2.1\nName: fleetserve\nVersion: 0.1.0\n' > /tmp/site/fleetserve-0.1.0.dist-info/METADATA
    printf '[vllm.general_plugins]\nfleetserve_flaggems = cluster.kernels.plugin:register\n' > /tmp/site/fleetserve-0.1.0.dist-info/entry_points.txt
  fi
}

if [ "${1:-}" = "--env-only" ]; then fleetserve_stack_env; return 0 2>/dev/null || exit 0; fi

set -uo pipefail
phases=${1:-stock,gems_compiled,gems_eager}
deadline=${2:-540}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
fleetserve_stack_env
export FLEETSERVE_FLAGGEMS_REPORT_DIR=/tmp/fleetserve-flaggems
M=$PWD/.models/served_gpu
[ -f $M/qwen2_5_vl_7b/config.json ] || python3 -m cluster.cli make-model --arch qwen2_5_vl --size 7b --out $M/qwen2_5_vl_7b
echo "setup $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The driver keeps its own deadline; the outer timeout is the safety net.
timeout -k 10 $(( deadline + 40 )) python3 benchmarks/gpu/served_compare.py run --out "$OUT/served.json" \
  --phases "$phases" --deadline-s "$deadline" 2>&1 \
  | grep --line-buffered -v -E "it/s\]|Processed prompts|^\s*$" | tee "$OUT/served.log"
echo "total $(( $(date +%s) - t0 )) s"
