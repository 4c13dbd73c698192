#!/bin/bash
# One phase of the FlagGems GPU validation on a device machine (staged stack).
#   FLEETSERVE_COMMIT=<sha> bash benchmarks/gpu/run_gpu.sh parity|bench7b|bench32b|profile [modes...]
# Results: $OUT/<phase>.json (merged) and $OUT/<phase>.log.
set -uo pipefail
phase=$1; shift || true
[ -f /tmp/site/.ok ] || { mkdir -p /tmp/site && cat /tmp/stage/part.* | xz -dc -T0 | tar -x -C /tmp/site && touch /tmp/site/.ok; }
export PYTHONPATH=$PWD:/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 GEMS_VENDOR=nvidia
# the plugin's entry point must be visible to importlib.metadata: a dist-info for fleetserve
if [ ! -d /tmp/site/fleetserve-0.1.0.dist-info ]; then
  mkdir -p /tmp/site/fleetserve-0.1.0.dist-info
  printf 'Metadata-Version: 2.1\nName: fleetserve\nVersion: 0.1.0\n' > /tmp/site/fleetserve-0.1.0.dist-info/METADATA
  printf '[vllm.general_plugins]\nfleetserve_flaggems = cluster.kernels.plugin:register\n' > /tmp/site/fleetserve-0.1.0.dist-info/entry_points.txt
fi
OUT=${OUT:-/tmp/out}; mkdir -p /tmp/res "$OUT"
LOG=$OUT/$phase.log
M7=/tmp/models/qwen2_5_vl_7b; M32=/tmp/models/qwen2_5_vl_32b
python3 benchmarks/gpu/models.py 7b $M7 >/dev/null; python3 benchmarks/gpu/models.py 32b $M32 >/dev/null
MQ2=/tmp/models/qwen2_5_7b; python3 benchmarks/gpu/models.py q2_7b $MQ2 >/dev/null
eng() { # arch mode extra...
  local arch=$1 mode=$2; shift 2
  local dir=$M7; [ "$arch" = 32b ] && dir=$M32; [ "$arch" = q2_7b ] && dir=$MQ2
  local tag=$mode; [ -n "${EXCLUDE:-}" ] && tag=${mode}_no_${EXCLUDE//,/_}; [ -n "${OPS:-}" ] && tag=${tag}_ops_${OPS}
  timeout ${ENG_TIMEOUT:-480} python3 benchmarks/gpu/bench_engine.py --arch $arch --mode $mode --model-dir $dir \
    --out /tmp/res/${phase}_${arch}_${tag}.json --exclude "${EXCLUDE:-}" --ops "${OPS:-default}" "$@" 2>&1 | grep -v -E "it/s\]|Processed prompts|^\s*$" | tail -n 60
}
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case $phase in
  parity)
    python3 benchmarks/gpu/parity.py --out /tmp/res/parity_ops.json 2>&1 | tail -n 80
    for m in stock gems_compiled; do eng 7b $m --skip-bench --logits-out /tmp/res/logits_7b_$m.npy; done
    python3 benchmarks/gpu/e2e_compare.py /tmp/res/logits_7b_stock.npy /tmp/res/logits_7b_gems_compiled.npy /tmp/res/parity_e2e_7b.json
    ;;
  bench7b|bench32b|benchq2_7b)
    arch=${phase#bench}
    modes=${*:-stock gems_compiled gems_full_decode gems_eager}; for m in $modes; do eng $arch $m; done
    ;;
  profile)
    modes=${*:-stock gems_compiled}; for m in $modes; do eng 7b $m --skip-bench --profile --output-len 64; done
    ;;
esac
} 2>&1 | tee $LOG
python3 - "$phase" "$OUT/$phase.json" <<'PY'
import glob, json, os, sys
phase, out = sys.argv[1], sys.argv[2]
res = {}
for f in sorted(glob.glob(f"/tmp/res/{phase}_*.json")):
    res[os.path.basename(f)[:-5]] = json.load(open(f))
json.dump(res, open(out, "w"), indent=1)
print("merged", list(res))
PY
