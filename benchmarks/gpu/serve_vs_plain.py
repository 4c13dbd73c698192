"""Serving overhead on GPUs: a deployment file through `fleetserve serve` vs plain `vllm serve`.

Both sides are measured by the same client, ``vllm bench serve`` (openai-chat,
``--ignore-eos``), on one machine, one after the other:

* ``serve``: ``fleetserve serve FILE --set ...`` exactly as an operator runs it
  (the file resolved in this shell, a local Ray head, Ray Serve + ray.serve.llm
  + vLLM behind fleetserve's ingress), ready when ``/health`` says 200.
* ``plain``: ``vllm serve`` with the *same* engine flags, derived from the same
  resolved spec by :func:`cluster.serving.app.engine_kwargs_for`, so the two
  cannot drift; ready when vLLM's ``/health`` says 200.

vLLM's compile cache is removed before each phase (both start cold).

    # on the GPU machine, stack staged (see benchmarks/gpu/README.md):
    python3 benchmarks/gpu/serve_vs_plain.py run --phase serve --model-dir DIR --out $OUT/serve.json \
        --set tensor_parallel_size=2 --set accelerator_type=null
    python3 benchmarks/gpu/serve_vs_plain.py run --phase plain --model-dir DIR --out $OUT/plain.json --set ...
    # here: merge what came back into benchmarks/results/ (JSON + plot) and print the docs table
    python3 benchmarks/gpu/serve_vs_plain.py report serve.json plain.json --name serve_vs_plain_qwen25vl32b_tp2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from provenance import command_line, provenance  # noqa: E402
from vllm_bench import bench_serve  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_FILE = ROOT / "deployments" / "qwen25_vl.yaml"
PORT = 9010

#: (dataset, concurrency, prompts): text 512 in / 128 out, and 2 images of 448x448 per request.
LOADS = [("random", 1, 16), ("random", 16, 128), ("random", 64, 256), ("random", 128, 512),
         ("random", 256, 512), ("random-mm", 16, 64)]


def resolved_spec(config: Path, overrides: list[str], model_dir: str):
    from cluster.serving.config_file import load_serve_config

    env = {**os.environ, "QWEN25_VL_32B_PATH": model_dir}
    cfg = load_serve_config(config, overrides, environ=env)
    (serving,) = cfg["_fleetserve"].values()
    return serving.models[0]


def plain_command(spec, port: int) -> list[str]:
    """``vllm serve`` with the engine flags the fleetserve replica gets."""
    from cluster.serving.app import engine_kwargs_for

    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", spec.model.source,
           "--served-model-name", spec.served_name, "--host", "127.0.0.1", "--port", str(port)]
    if os.environ.get("OPENAI_API_KEY"):  # the same authentication as the fleetserve endpoint
        cmd += ["--api-key", os.environ["OPENAI_API_KEY"]]
    for key, value in engine_kwargs_for(spec).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is False:
            cmd.append(flag.replace("--", "--no-", 1))
        else:
            cmd += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return cmd


def wait_health(url: str, proc: subprocess.Popen, deadline: float) -> float | None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return None


def bench(base: str, spec, dataset: str, concurrency: int, prompts: int, workdir: Path) -> dict[str, Any]:
    """One load through the shared client (benchmarks/vllm_bench.py: ``vllm bench serve``)."""
    return bench_serve(base, spec.served_name, spec.model.source, dataset, concurrency, prompts, workdir,
                       input_len=512 if dataset == "random" else 128, output_len=128)


def run(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.deadline_s
    spec = resolved_spec(args.file, args.set, args.model_dir)
    shutil.rmtree(Path.home() / ".cache" / "vllm", ignore_errors=True)  # both phases start cold
    env = {**os.environ, "QWEN25_VL_32B_PATH": args.model_dir}
    if args.phase == "serve":
        cmd = [sys.executable, "-m", "cluster.cli", "serve", str(args.file), "--ready-timeout", str(args.deadline_s)]
        for item in args.set:
            cmd += ["--set", item]
        health = f"http://127.0.0.1:{PORT}/health"
    else:
        cmd = plain_command(spec, PORT)
        health = f"http://127.0.0.1:{PORT}/health"
    result: dict[str, Any] = {
        "phase": args.phase, **provenance(), "host": platform.node(),
        "server_command": " ".join(c if c != os.environ.get("OPENAI_API_KEY") else "<key>" for c in cmd), "file": str(args.file.relative_to(ROOT)), "overrides": args.set,
        "model": spec.served_name, "tensor_parallel_size": spec.tensor_parallel_size,
        "pipeline_parallel_size": spec.pipeline_parallel_size, "flaggems": spec.flaggems.enabled,
        "env": {k: os.environ[k] for k in sorted(os.environ) if k.startswith(("RAY_SERVE", "RAYLLM"))},
        "loads_asked": args.loads or "all",
    }
    log = open(Path(args.out).with_suffix(".log"), "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ready = wait_health(health, proc, deadline)
        result["ready_s"] = round(ready, 1) if ready is not None else None
        result["loads"] = []
        if ready is None:
            result["error"] = f"not ready (exit {proc.poll()}); see {Path(args.out).with_suffix('.log').name}"
        else:
            import httpx

            if args.phase == "serve":
                result["health"] = httpx.get(health, timeout=10).json()
            with tempfile.TemporaryDirectory() as tmp:
                for dataset, concurrency, prompts in [x for x in LOADS if not args.loads or
                                                      f"{x[0]}_c{x[1]}" in args.loads.split(",")]:
                    if time.monotonic() > deadline - 30:
                        result["loads"].append({"load": f"{dataset}_c{concurrency}", "error": "deadline"})
                        continue
                    result["loads"].append(bench(f"http://127.0.0.1:{PORT}", spec, dataset, concurrency,
                                                 prompts, Path(tmp)))
                    print(json.dumps(result["loads"][-1]), flush=True)
                    Path(args.out).write_text(json.dumps(result, indent=1))
    finally:
        result["total_s"] = round(time.monotonic() - t0, 1)
        Path(args.out).write_text(json.dumps(result, indent=1))
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # fleetserve serve tears the app down, stops its Ray head
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def report(args: argparse.Namespace) -> None:
    runs = {r["phase"]: r for r in (json.loads(Path(p).read_text()) for p in args.results)}
    serve, plain = runs.get("serve"), runs.get("plain")
    rows = []
    for load in (plain or {}).get("loads", []):
        other = next((x for x in (serve or {}).get("loads", []) if x["load"] == load["load"]), {})
        row = {"load": load["load"], "plain_tok_s": load.get("output_throughput"),
               "serve_tok_s": other.get("output_throughput"),
               "plain_ttft_p50_ms": load.get("median_ttft_ms"), "serve_ttft_p50_ms": other.get("median_ttft_ms"),
               "plain_tpot_p50_ms": load.get("median_tpot_ms"), "serve_tpot_p50_ms": other.get("median_tpot_ms"),
               "failed": [load.get("failed"), other.get("failed")]}
        if row["plain_tok_s"] and row["serve_tok_s"]:
            row["ratio"] = round(row["serve_tok_s"] / row["plain_tok_s"], 4)
        rows.append(row)
    out = {
        "what": "fleetserve serve vs plain vllm serve, same engine flags, client vllm bench serve (openai-chat, "
                "--ignore-eos); random = 512 in / 128 out, random-mm = 2 images 448x448 + 128 in / 128 out",
        "commit": (serve or plain or {}).get("commit"), "device": (serve or plain or {}).get("device"),
        "commands": {p: r.get("server_command", r.get("command")) for p, r in runs.items()},
        "run_commands": {p: r.get("command") for p, r in runs.items() if "server_command" in r},
        "report_command": command_line(),
        "ready_s": {p: r.get("ready_s") for p, r in runs.items()},
        "rows": rows, "runs": runs, "not_run": args.not_run, "note": args.note,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    print("| load | plain vLLM tok/s | fleetserve tok/s | ratio | TTFT p50 plain / fleetserve (ms) | "
          "TPOT p50 plain / fleetserve (ms) |\n|---|---|---|---|---|---|")
    for r in rows:
        f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        ratio = f"{r['ratio'] * 100:.1f}%" if r.get("ratio") else "-"
        print(f"| {r['load']} | {f(r['plain_tok_s'])} | {f(r['serve_tok_s'])} | {ratio} | "
              f"{f(r['plain_ttft_p50_ms'])} / {f(r['serve_ttft_p50_ms'])} | "
              f"{f(r['plain_tpot_p50_ms'])} / {f(r['serve_tpot_p50_ms'])} |")
    print(f"ready: {out['ready_s']}")
    plot_ratio_bars(rows, ("plain_tok_s", "plain vllm serve"), ("serve_tok_s", "fleetserve serve"),
                    f"{out['device']} @ {str(out['commit'])[:8]}", args.results_dir / f"{args.name}.png")


def plot_ratio_bars(rows: list[dict[str, Any]], base: tuple[str, str], other: tuple[str, str], title: str,
                    path: Path) -> None:
    """Output tok/s per load, ``base`` and ``other`` (row key, legend label) side by side, the ratio above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[base[0]] or 0 for r in rows], 0.4, label=base[1])
    ax.bar([x + 0.2 for x in xs], [r[other[0]] or 0 for r in rows], 0.4, label=other[1])
    for x, r in zip(xs, rows):
        if r.get("ratio"):
            ax.text(x, max(r[base[0]], r[other[0]]), f"{r['ratio'] * 100:.0f}%", ha="center", va="bottom",
                    fontsize=8)
    ax.set_xticks(list(xs), [r["load"] for r in rows], rotation=20)
    ax.set_ylabel("output tokens/s")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--phase", choices=("serve", "plain"), required=True)
    r.add_argument("--file", type=Path, default=DEFAULT_FILE)
    r.add_argument("--model-dir", required=True)
    r.add_argument("--set", action="append", default=[])
    r.add_argument("--out", required=True)
    r.add_argument("--deadline-s", type=float, default=540)
    r.add_argument("--loads", default="", help="comma list of LOAD names (e.g. random_c128,random-mm_c16); default all")
    p = sub.add_parser("report")
    p.add_argument("results", nargs="+")
    p.add_argument("--name", required=True)
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where NAME.json and NAME.png go")
    p.add_argument("--not-run", action="append", default=[])
    p.add_argument("--note", default="")
    args = parser.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
