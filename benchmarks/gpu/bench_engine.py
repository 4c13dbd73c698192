"""Offline vLLM engine benchmark of one kernel mode (one engine per process).

Modes:
  stock              vLLM defaults (torch.compile + full & piecewise CUDA graphs)
  stock_eager        vLLM stock ops, enforce_eager
  gems_<graph_mode>  FlagGems default op set with that graph mode
                     (compiled | full_decode | piecewise | eager)

The FlagGems modes go through exactly what a deployment's replica does: the plan
of ``cluster.kernels.plan_kernels`` (host probe included), its env (which the
vLLM plugin follows in every process) and its engine kwargs.

Workload: N requests x IN prompt tokens (random ids, fixed seed) x OUT output
tokens (ignore_eos), all submitted at once -> output tok/s; then single stream
(one request at a time, median of R) -> tok/s of one user. Optional: first-step
full-vocab logprobs of fixed prompts after re-initialising the dummy weights
with a realistic, seeded distribution (saved to .npy for the e2e comparison),
and a torch-profiler pass that splits GPU kernel time into Triton / other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for provenance.py
from provenance import provenance  # noqa: E402

os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


def realistic_init(model) -> int:
    """Seeded N(0, 0.02) linear/embedding weights, norm weights ~1: logits then
    have a spread like a trained model's, so top-1 agreement means something
    (vLLM's dummy init is U(-1e-3, 1e-3): near-uniform logits)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(1234)
    n = 0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if not p.is_floating_point():
                continue
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32))
            elif "bias" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32))
            n += 1
    return n


def build(mode: str, model_dir: str, max_len: int, gpu_util: float, record: bool, exclude: list[str],
          ops: str = "default"):
    from vllm import LLM
    from cluster.kernels import FlagGemsConfig, plan_kernels

    kwargs: dict = dict(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                        max_model_len=max_len, gpu_memory_utilization=gpu_util, seed=0,
                        max_logprobs=-1, enable_prefix_caching=False)
    if "vision_config" in json.loads((Path(model_dir) / "config.json").read_text()):
        kwargs["limit_mm_per_prompt"] = {"image": 0, "video": 0}  # VL model, text path only
    if mode == "stock_eager":
        kwargs["enforce_eager"] = True
    elif mode.startswith("gems_"):
        cfg = FlagGemsConfig(enabled=True, graph_mode=mode[len("gems_"):], record=record, exclude=exclude, ops=ops)
        plan = plan_kernels(cfg, f"bench-{mode}")
        os.environ.update(plan.env(os.environ))
        kwargs.update(plan.engine_kwargs())
    elif mode != "stock":
        raise SystemExit(f"unknown mode {mode}")
    t0 = time.time()
    llm = LLM(**kwargs)
    return llm, time.time() - t0, kwargs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--arch", default="")
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--single-reps", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--gpu-util", type=float, default=0.90)
    ap.add_argument("--logits-out", default="")
    ap.add_argument("--logit-prompts", type=int, default=16)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--exclude", default="", help="comma-separated ops to leave out of the default set")
    ap.add_argument("--ops", default="default", help="named FlagGems op set (default | norms | all)")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args()
    if args.profile or args.logits_out:
        # apply_model / the profiler need the engine core (and its worker) in this process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    import numpy as np
    import torch
    from vllm import SamplingParams, TokensPrompt

    llm, init_s, kwargs = build(args.mode, args.model_dir, args.max_len, args.gpu_util, record=False,
                                 exclude=[e for e in args.exclude.split(",") if e], ops=args.ops)
    rng = np.random.default_rng(0)
    vocab = 150000
    result: dict = {**provenance(), "mode": args.mode, "exclude": args.exclude, "ops": args.ops, "arch": args.arch,
                    "engine_kwargs": {k: v for k, v in kwargs.items() if k != "model"}, "init_s": init_s}
    try:
        import flag_gems, triton, vllm
        result["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__, "triton": triton.__version__,
                              "flag_gems": flag_gems.__version__}
    except Exception as exc:
        result["versions_error"] = str(exc)

    def prompts(n, length):
        return [TokensPrompt(prompt_token_ids=rng.integers(100, vocab, length).tolist()) for _ in range(n)]

    if args.logits_out:
        n_init = llm.apply_model(realistic_init)
        ps = [TokensPrompt(prompt_token_ids=np.random.default_rng(7 + i).integers(100, vocab, 64 + 8 * i).tolist())
              for i in range(args.logit_prompts)]
        outs = llm.generate(ps, SamplingParams(max_tokens=1, logprobs=-1, temperature=0.0), use_tqdm=False)
        mat = np.full((len(outs), 152064), -np.inf, dtype=np.float32)
        for i, o in enumerate(outs):
            lp = o.outputs[0].logprobs[0]
            ids = np.fromiter(lp.keys(), dtype=np.int64, count=len(lp))
            vals = np.fromiter((v.logprob for v in lp.values()), dtype=np.float32, count=len(lp))
            mat[i, ids] = vals
        np.save(args.logits_out, mat)
        result["logits"] = {"file": args.logits_out, "prompts": len(outs), "reinit_params": n_init}

    if not args.skip_bench:
        sp = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
        llm.generate(prompts(8, args.input_len), SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
        batch = prompts(args.requests, args.input_len)
        t0 = time.perf_counter()
        outs = llm.generate(batch, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        result["throughput"] = {"requests": args.requests, "input_len": args.input_len, "output_len": args.output_len,
                                "seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt,
                                "total_tok_s": (n_out + args.requests * args.input_len) / dt}
        single = []
        for p in prompts(args.single_reps, args.input_len):
            t0 = time.perf_counter()
            o = llm.generate([p], sp, use_tqdm=False)
            single.append(len(o[0].outputs[0].token_ids) / (time.perf_counter() - t0))
        result["single_stream"] = {"reps": single, "tok_s": statistics.median(single)}
        print(f"[{args.arch} {args.mode}] throughput {n_out/dt:.0f} out tok/s; single-stream "
              f"{statistics.median(single):.1f} tok/s", flush=True)

    if args.profile:
        result["profile"] = profile(llm, prompts(32, args.input_len), args.output_len)

    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def profile(llm, batch, out_len: int) -> dict:
    """GPU kernel time by kind over one batch (prefill + decode, graphs included)."""
    import torch
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=out_len, ignore_eos=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate(batch, sp, use_tqdm=False)
    per: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name] = per.get(ev.name, 0.0) + ev.device_time_total
    total = sum(per.values()) or 1.0
    gems_names = ("rms_norm_kernel", "rms_norm_loop_kernel", "fused_add_rms_norm_kernel",
                  "silu_and_mul", "apply_rotary_pos_emb")

    def kind(name: str) -> str:
        if any(name.startswith(g) or g in name and "vllm::" not in name and "void" not in name for g in gems_names):
            return "triton_flaggems"
        if name.startswith("triton_") or name.startswith("_triton") or "_kernel_rank_" in name:
            return "triton_inductor_or_vllm"
        if name.startswith("_") and "(" not in name and "<" not in name and "::" not in name and not name.startswith("__"):
            return "triton_inductor_or_vllm"
        return "cuda_other"

    by_kind: dict[str, float] = {}
    for n, t in per.items():
        by_kind[kind(n)] = by_kind.get(kind(n), 0.0) + t
    top = sorted(per.items(), key=lambda kv: -kv[1])[:25]
    return {"total_kernel_us": total, "share": {k: v / total for k, v in by_kind.items()},
            "top_kernels": [{"name": n[:120], "us": t, "share": t / total, "kind": kind(n)} for n, t in top]}


if __name__ == "__main__":
    sys.exit(main())
