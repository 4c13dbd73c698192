"""Serving figures of an OpenAI endpoint at fixed concurrency, measured by ``vllm bench serve``; JSON + a plot.

For each concurrency level, ``--requests`` random prompts (``--input-len`` tokens
in, ``--max-tokens`` out, ``--ignore-eos``) go through vLLM's own benchmark client
(benchmarks/vllm_bench.py), which measures time to first token (TTFT), time per
output token (TPOT), end-to-end latency and output throughput.

    # against a running endpoint
    python benchmarks/bench_serving.py --url http://127.0.0.1:8000 --model tiny-qwen2.5-vl --tokenizer DIR
    # start deployments/tiny.yaml on a local Ray cluster first (CPU baseline)
    python benchmarks/bench_serving.py --launch deployments/tiny.yaml --out benchmarks/results/serving_cpu_tiny

Results: ``<out>.json`` (with commit, device and command line) and ``<out>.png``
(throughput and TTFT/TPOT p50/p99 vs concurrency).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from provenance import provenance  # noqa: E402
from vllm_bench import as_level, bench_serve  # noqa: E402
from waiting import wait_healthy  # noqa: E402


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    c = [lv["concurrency"] for lv in levels]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot(c, [lv["output_tok_per_s"] for lv in levels], "o-")
    axes[0].set(title="output throughput", xlabel="concurrency", ylabel="tokens/s")
    for key, ax, name in (("ttft", axes[1], "TTFT"), ("tpot", axes[2], "TPOT")):
        ax.plot(c, [lv[f"{key}_p50_s"] * 1000 for lv in levels], "o-", label="p50")
        ax.plot(c, [lv[f"{key}_p99_s"] * 1000 for lv in levels], "s--", label="p99")
        ax.set(title=name, xlabel="concurrency", ylabel="ms")
        ax.legend()
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['model']} @ {result['label']}  ({result['requests_per_level']} req/level, "
                 f"{result['max_tokens']} output tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def launch(config: Path, port: int):
    """Start the config's first app on a local Ray cluster; return its model's (served name, source)."""
    import ray
    import yaml
    from ray import serve

    from cluster.serving.app import build_app

    cfg = yaml.safe_load(config.read_text())
    app_cfg = cfg["applications"][0]
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_cfg["args"]), name=app_cfg["name"], route_prefix="/", blocking=False)
    from cluster.serving.spec import load_serving_args

    spec = load_serving_args(app_cfg["args"]).models[0]
    return spec.served_name, str(spec.model.source)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--launch", type=Path, default=None, help="Serve config to start locally first.")
    ap.add_argument("--port", type=int, default=8020)
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--requests", type=int, default=32, help="Requests per concurrency level.")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=64, help="Random prompt tokens per request.")
    ap.add_argument("--tokenizer", default=None, help="Tokenizer (model dir) for vllm bench serve; with "
                    "--launch, the config's model.")
    ap.add_argument("--label", default=platform.node())
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serving")
    args = ap.parse_args()

    url, model, tokenizer = args.url, args.model, args.tokenizer
    if args.launch:
        launched, source = launch(args.launch, args.port)
        model, tokenizer = model or launched, tokenizer or source
        url = f"http://127.0.0.1:{args.port}"
    if not url or not model or not tokenizer:
        sys.exit("give --url, --model and --tokenizer, or --launch CONFIG")
    wait_healthy(url, 900)
    levels = []
    with tempfile.TemporaryDirectory() as tmp:
        bench_serve(url, model, tokenizer, "random", 1, 2, Path(tmp), args.input_len, args.max_tokens)  # warm-up
        for c in (int(x) for x in args.concurrency.split(",")):
            lv = as_level(bench_serve(url, model, tokenizer, "random", c, max(args.requests, c), Path(tmp),
                                      args.input_len, args.max_tokens))
            if "error" in lv:
                sys.exit(f"vllm bench serve at c={c} failed: {lv['error']}")
            print(f"c={c:3d}  {lv['output_tok_per_s']:8.1f} tok/s  TTFT p50 {lv['ttft_p50_s']*1000:7.1f} ms "
                  f"p99 {lv['ttft_p99_s']*1000:7.1f} ms  TPOT p50 {lv['tpot_p50_s']*1000:6.1f} ms "
                  f"p99 {lv['tpot_p99_s']*1000:6.1f} ms  failed {lv['failed']}", flush=True)
            levels.append(lv)
    import ray
    import vllm

    result = {
        **provenance(),
        "client": "vllm bench serve --backend openai-chat --dataset-name random --ignore-eos",
        "model": model, "url": url, "label": args.label, "max_tokens": args.max_tokens,
        "input_len": args.input_len, "requests_per_level": args.requests,
        "host": {"machine": platform.machine(), "processor": platform.processor(), "node": platform.node(),
                 "cpus": __import__("os").cpu_count()},
        "versions": {"vllm": vllm.__version__, "ray": ray.__version__, "python": platform.python_version()},
        "levels": levels,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and .png")
    if args.launch:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
