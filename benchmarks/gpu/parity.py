"""Per-op parity: each FlagGems op against vLLM's stock op, on the GPU.

Every op of the default set runs through the same vLLM entry point a model
uses (IR op dispatch with the ``flaggems`` provider first vs vLLM's own
``vllm_c`` kernel; the patched ``forward_cuda`` vs the stock one), on the
shapes of the benchmarked architectures (Qwen2.5-VL-7B/32B text model and the
vision tower) in bf16 and fp16, several token counts, fresh random inputs per
case. Pass: ``|gems - stock| <= atol + rtol * |stock|`` elementwise with vLLM's
IR tolerances (vllm/ir/tolerances.py and the op overrides), no NaN/Inf. Also
reported: each side's error against a float64 reference, and kernel times
(median, CUDA events via triton.testing.do_bench).

Usage (device machine, staged stack on PYTHONPATH):
    python3 benchmarks/gpu/parity.py --out $OUT/flaggems_parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for provenance.py
from provenance import provenance  # noqa: E402

os.environ.setdefault("GEMS_VENDOR", "nvidia")

TOKENS = (1, 7, 256, 4096)
HIDDEN = (1280, 3584, 5120)          # vision tower, 7B, 32B
INTER = (18944, 27648)               # MLP intermediate (silu_and_mul halves 2x this)
HEADS = ((28, 4), (40, 8), (16, 16))  # (q heads, kv heads): 7B, 32B, vision
DTYPES = (torch.bfloat16, torch.float16)


def tol(op, dtype):
    t = dict(op.get_tolerance(dtype)) if op is not None else {}
    if not t:
        t = {torch.bfloat16: {"atol": 1e-3, "rtol": 1.6e-2}, torch.float16: {"atol": 1e-3, "rtol": 1e-3}}[dtype]
    return t


def compare(gems, stock, ref, atol, rtol):
    g, s, r = gems.double(), stock.double(), ref.double()
    finite = bool(torch.isfinite(g).all())
    diff = (g - s).abs()
    bound = atol + rtol * s.abs()
    ok = finite and bool((diff <= bound).all())
    return {
        "max_abs_diff": float(diff.max()),
        "max_abs_stock": float(s.abs().max()),
        "violations": int((diff > bound).sum()),
        "rel_err_gems_vs_fp64": float((g - r).norm() / r.norm()),
        "rel_err_stock_vs_fp64": float((s - r).norm() / r.norm()),
        "pass": ok,
    }


def bench(fn):
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from vllm import ir
    from vllm.config import VllmConfig, set_current_vllm_config
    import vllm.kernels  # noqa: F401  (registers vllm_c impls)
    from cluster.kernels import ops as gems

    res = gems.install(tuple(gems.INSTALLERS))  # all ops, available
    print({k: v.status + (f" ({v.reason})" if v.reason else "") for k, v in res.items()}, flush=True)
    torch.manual_seed(0)
    cases = []
    t0 = time.time()

    def add(op, shape, dtype, cmp, t_gems=None, t_stock=None):
        row = {"op": op, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), **cmp}
        if t_gems is not None:
            row.update(ms_gems=t_gems, ms_stock=t_stock)
        cases.append(row)

    dev = "cuda"
    rms, far = ir.ops.rms_norm, ir.ops.fused_add_rms_norm
    for dtype in DTYPES:
        for h in HIDDEN:
            for t in TOKENS:
                x = torch.randn(t, h, dtype=dtype, device=dev) * 3
                w = (1 + 0.1 * torch.randn(h, dtype=dtype, device=dev))
                eps = 1e-6
                ref = ir.ops.rms_norm.impls["native"].impl_fn(x.double(), w.double(), eps)
                with rms.set_priority(["flaggems", "native"]):
                    out_g = rms(x, w, eps)
                    tg = bench(lambda: rms(x, w, eps)) if t == 4096 else None
                with rms.set_priority(["vllm_c", "native"]):
                    out_s = rms(x, w, eps)
                    ts = bench(lambda: rms(x, w, eps)) if t == 4096 else None
                add("rms_norm", (t, h), dtype, compare(out_g, out_s, ref, **tol(rms, dtype)), tg, ts)

                r = torch.randn(t, h, dtype=dtype, device=dev)
                ref_o, ref_r = far.impls["native"].impl_fn(x.double(), r.double(), w.double(), eps)
                xg, rg = x.clone(), r.clone()
                xs, rs = x.clone(), r.clone()
                with far.set_priority(["flaggems", "native"]):
                    og, nrg = far.maybe_inplace(xg, rg, w, eps)
                with far.set_priority(["vllm_c", "native"]):
                    os_, nrs = far.maybe_inplace(xs, rs, w, eps)
                c1 = compare(og, os_, ref_o, **tol(far, dtype))
                c2 = compare(nrg, nrs, ref_r, **tol(far, dtype))
                c1["pass"] = c1["pass"] and c2["pass"]
                c1["residual_max_abs_diff"] = c2["max_abs_diff"]
                tg = ts = None
                if t == 4096:
                    with far.set_priority(["flaggems", "native"]):
                        tg = bench(lambda: far.maybe_inplace(xg, rg, w, eps))
                    with far.set_priority(["vllm_c", "native"]):
                        ts = bench(lambda: far.maybe_inplace(xs, rs, w, eps))
                add("fused_add_rms_norm", (t, h), dtype, c1, tg, ts)

    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
    with set_current_vllm_config(VllmConfig()):
        act = SiluAndMul()
        stock_fwd = SiluAndMul.forward_cuda.__wrapped_stock__
        for dtype in DTYPES:
            for i in INTER + (3420,):
                for t in TOKENS:
                    x = torch.randn(t, 2 * i, dtype=dtype, device=dev) * 2
                    ref = SiluAndMul.forward_native(x.double())
                    og, os_ = act.forward_cuda(x), stock_fwd(act, x)
                    tg = bench(lambda: act.forward_cuda(x)) if t == 4096 else None
                    ts = bench(lambda: stock_fwd(act, x)) if t == 4096 else None
                    add("silu_and_mul", (t, 2 * i), dtype, compare(og, os_, ref, atol=1e-3, rtol=1.6e-2 if dtype == torch.bfloat16 else 1e-3), tg, ts)

        rope_stock = RotaryEmbedding.forward_cuda.__wrapped_stock__
        for dtype in DTYPES:
            rope = RotaryEmbedding(128, 128, 32768, 1e6, True, dtype).to(dev)
            for hq, hk in HEADS:
                for t in TOKENS:
                    pos = torch.randint(0, 32768, (t,), device=dev)
                    qkv = torch.randn(t, (hq + 2 * hk) * 128, dtype=dtype, device=dev)
                    q, k, _ = qkv.split([hq * 128, hk * 128, hk * 128], dim=-1)
                    qr, kr = RotaryEmbedding.forward_static(pos, q.double(), k.double(), 128, 128,
                                                            rope.cos_sin_cache.double(), True)
                    qkv_g, qkv_s = qkv.clone(), qkv.clone()
                    qg, kg, _ = qkv_g.split([hq * 128, hk * 128, hk * 128], dim=-1)
                    qs, ks, _ = qkv_s.split([hq * 128, hk * 128, hk * 128], dim=-1)
                    qg, kg = rope.forward_cuda(pos, qg, kg)
                    qs, ks = rope_stock(rope, pos, qs, ks)
                    c1 = compare(qg, qs, qr, atol=1e-3, rtol=1.6e-2 if dtype == torch.bfloat16 else 1e-3)
                    c2 = compare(kg, ks, kr, atol=1e-3, rtol=1.6e-2 if dtype == torch.bfloat16 else 1e-3)
                    c1["pass"] = c1["pass"] and c2["pass"]
                    c1["max_abs_diff"] = max(c1["max_abs_diff"], c2["max_abs_diff"])
                    tg = ts = None
                    if t == 4096:
                        tg = bench(lambda: rope.forward_cuda(pos, qg, kg))
                        ts = bench(lambda: rope_stock(rope, pos, qs, ks))
                    add("rotary_embedding", (t, hq, hk, 128), dtype, c1, tg, ts)

    summary = {}
    for row in cases:
        s = summary.setdefault(row["op"], {"cases": 0, "passed": 0, "max_abs_diff": 0.0, "max_rel_err_gems_vs_fp64": 0.0,
                                          "max_rel_err_stock_vs_fp64": 0.0})
        s["cases"] += 1
        s["passed"] += int(row["pass"])
        s["max_abs_diff"] = max(s["max_abs_diff"], row["max_abs_diff"])
        s["max_rel_err_gems_vs_fp64"] = max(s["max_rel_err_gems_vs_fp64"], row["rel_err_gems_vs_fp64"])
        s["max_rel_err_stock_vs_fp64"] = max(s["max_rel_err_stock_vs_fp64"], row["rel_err_stock_vs_fp64"])
    import flag_gems, triton, vllm
    out = {**provenance(), "versions": {"torch": torch.__version__, "triton": triton.__version__,
           "vllm": vllm.__version__, "flag_gems": flag_gems.__version__}, "install": {k: vars(v) for k, v in res.items()},
           "summary": summary, "cases": cases, "seconds": time.time() - t0}
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"{'op':20s} {'pass':>9s} {'max|d|':>9s} {'rel_g':>9s} {'rel_s':>9s}")
    for op, s in summary.items():
        print(f"{op:20s} {s['passed']:>4d}/{s['cases']:<4d} {s['max_abs_diff']:9.2e} {s['max_rel_err_gems_vs_fp64']:9.2e} {s['max_rel_err_stock_vs_fp64']:9.2e}")
    for row in cases:
        if "ms_gems" in row and row["ms_gems"] is not None:
            print(f"  time {row['op']:20s} {str(row['shape']):22s} {row['dtype']:9s} gems {row['ms_gems']*1e3:8.1f}us stock {row['ms_stock']*1e3:8.1f}us")
    return 0 if all(s["passed"] == s["cases"] for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
