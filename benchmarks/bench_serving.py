"""Drive an OpenAI endpoint at fixed concurrency; write JSON + a plot.

For each concurrency level, ``--requests`` streaming chat requests are sent by
that many concurrent clients; per request we record time to first token (TTFT),
time per output token after the first (TPOT) and the end-to-end latency, and
per level the output-token throughput. Token counts come from the server's
``usage`` (``stream_options.include_usage``), not from counting chunks.

    # against a running endpoint
    python benchmarks/bench_serving.py --url http://127.0.0.1:8000 --model tiny-qwen2.5-vl
    # start deployments/tiny.yaml on a local Ray cluster first (CPU baseline)
    python benchmarks/bench_serving.py --launch deployments/tiny.yaml --out benchmarks/results/serving_cpu_tiny

Results: ``<out>.json`` and ``<out>.png`` (throughput and TTFT/TPOT p50/p99 vs concurrency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": prompt}],
    }
    t0 = time.perf_counter()
    first = None
    usage = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "error": (await r.aread()).decode()[:200]}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter()
    end = time.perf_counter()
    out_tokens = (usage or {}).get("completion_tokens", 0)
    ttft = (first or end) - t0
    tpot = (end - (first or end)) / max(out_tokens - 1, 1)
    return {"ok": True, "ttft": ttft, "tpot": tpot, "latency": end - t0, "out_tokens": out_tokens,
            "in_tokens": (usage or {}).get("prompt_tokens", 0)}


async def run_level(url: str, model: str, concurrency: int, requests: int, prompt: str, max_tokens: int) -> dict:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker() -> None:
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await one_request(client, url, model, prompt, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    out_tokens = sum(r["out_tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok]
    lat = [r["latency"] for r in ok]
    return {
        "concurrency": concurrency, "requests": requests, "succeeded": len(ok), "failed": len(results) - len(ok),
        "wall_s": wall, "output_tokens": out_tokens, "output_tok_per_s": out_tokens / wall,
        "requests_per_s": len(ok) / wall,
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
        "tpot_p50_s": percentile(tpot, 0.5), "tpot_p99_s": percentile(tpot, 0.99),
        "latency_p50_s": percentile(lat, 0.5), "latency_p99_s": percentile(lat, 0.99),
        "mean_input_tokens": statistics.mean(r["in_tokens"] for r in ok) if ok else 0,
        "errors": [r for r in results if not r["ok"]][:5],
    }


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
    """Start the config's first app on a local Ray cluster; return the model name."""
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

    return load_serving_args(app_cfg["args"]).models[0].served_name


def wait_healthy(url: str, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--launch", type=Path, default=None, help="Serve config to start locally first.")
    ap.add_argument("--port", type=int, default=8020)
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--requests", type=int, default=32, help="Requests per concurrency level.")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--label", default=platform.node())
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serving")
    args = ap.parse_args()

    url, model = args.url, args.model
    if args.launch:
        model = model or launch(args.launch, args.port)
        url = f"http://127.0.0.1:{args.port}"
    if not url or not model:
        sys.exit("give --url and --model, or --launch CONFIG")
    wait_healthy(url)
    prompt = " ".join(["benchmark"] * args.prompt_words)
    asyncio.run(run_level(url, model, 1, 2, prompt, args.max_tokens))  # warm-up
    levels = []
    for c in (int(x) for x in args.concurrency.split(",")):
        lv = asyncio.run(run_level(url, model, c, max(args.requests, c), prompt, args.max_tokens))
        print(f"c={c:3d}  {lv['output_tok_per_s']:8.1f} tok/s  TTFT p50 {lv['ttft_p50_s']*1000:7.1f} ms "
              f"p99 {lv['ttft_p99_s']*1000:7.1f} ms  TPOT p50 {lv['tpot_p50_s']*1000:6.1f} ms "
              f"p99 {lv['tpot_p99_s']*1000:6.1f} ms  failed {lv['failed']}", flush=True)
        levels.append(lv)
    import ray
    import vllm

    result = {
        "model": model, "url": url, "label": args.label, "max_tokens": args.max_tokens,
        "prompt_words": args.prompt_words, "requests_per_level": args.requests,
        "host": {"machine": platform.machine(), "processor": platform.processor(), "node": platform.node(),
                 "cpus": __import__("os").cpu_count()},
        "versions": {"vllm": vllm.__version__, "ray": ray.__version__, "python": platform.python_version()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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
