#!/bin/bash
# The two-host rig (benchmarks/gpu/two_host_rig.py) in one device call, on a machine with the stack
# staged (benchmarks/gpu/README.md) and .rig-debs carried (benchmarks/gpu/rig-debs.sh made it here):
#   bash benchmarks/gpu/run_two_host_rig.sh PHASES [two_host_rig.py run flags ...]
#   e.g. bash benchmarks/gpu/run_two_host_rig.sh up,serve,place,chat,bench --loads random_c1,random_c16
# Writes $OUT/rig-PHASES.json (rewritten after each phase) and $OUT/rig-PHASES-logs.tgz (the hosts' sshd
# and Ray logs, NCCL's INFO files, the single-host serve log): two files, well inside what comes back.
set -uo pipefail
phases=${1:?usage: run_two_host_rig.sh PHASES [flags]}; shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
name="rig-${phases//,/-}"
source benchmarks/gpu/run_served.sh --env-only
source benchmarks/gpu/rig-tools.sh .rig-debs /tmp/rigroot || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
rm -rf /tmp/fleetserve-rig/nccl /tmp/fleetserve-rig/host-logs
# The driver keeps its own deadline (DEADLINE_S); the outer timeout is the safety net inside the 600 s call.
timeout -k 10 $(( ${DEADLINE_S:-540} + 30 )) \
  python3 benchmarks/gpu/two_host_rig.py run --phases "$phases" --out "$OUT/$name.json" \
  --deadline-s "${DEADLINE_S:-540}" "$@" 2>&1 | grep --line-buffered -v -E "it/s\]|Processed prompts|^\s*$"
rc=${PIPESTATUS[0]}
tar -C /tmp/fleetserve-rig -czf "$OUT/$name-logs.tgz" --ignore-failed-read \
  nccl host-logs single-serve.log hostfile fs-h1/sshd.log fs-h2/sshd.log 2>/dev/null
exit "$rc"
