"""Scale-out and fault figures on one local Ray cluster (tiny text model, real vLLM on CPU).

Drives the OpenAI endpoint with the tests' closed-loop load client
(tests/loadgen.py: the real ``openai`` client, 503 + Retry-After retried) while
the cluster goes through: autoscale 1 -> 2 replicas under load, one replica
actor killed under load (Serve restarts it), idle scale-down to 1, and the last
replica killed (clients must get 503 + Retry-After, then recover). The figures:

* seconds from load start to the second replica RUNNING, kill to replacement,
  idle to one replica, last kill to restart,
* per phase, requests sent / succeeded / retried (client, after 503 +
  Retry-After) / failed and the longest request (no hangs),
* a PNG timeline: answers/s by final status, replicas RUNNING, events.

Latency and throughput are not measured here (benchmarks/bench_serving.py,
through ``vllm bench serve``, does that).

    .venv/bin/python benchmarks/bench_scaleout.py --out benchmarks/results/scaleout_local_cpu

Writes ``OUT.json`` and ``OUT.png``. Figures, not asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from loadgen import Load  # noqa: E402
from provenance import provenance  # noqa: E402
from tinyqwen2 import tiny_args, tiny_qwen2  # noqa: E402
from waiting import wait_for, wait_healthy  # noqa: E402

MODEL, APP = "tiny-text", "scaleout"
DEPLOYMENT = f"FleetLLMServer:{MODEL}"


def replicas() -> list[dict[str, Any]]:
    from cluster.serving.status import fetch_serve_details

    return fetch_serve_details()["applications"][APP]["deployments"][DEPLOYMENT]["replicas"]


def n_running() -> int:
    return sum(1 for r in replicas() if str(r["state"]) == "RUNNING")


def kill_and_wait_replaced(victim: dict[str, Any], running: int, what: str) -> None:
    """Kill one replica's actor (no restart by Ray: Serve must replace it) and wait until ``running``
    replicas run again, none of them the victim."""
    import ray

    ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
    wait_for(lambda: n_running() == running and victim["replica_id"] not in {r["replica_id"] for r in replicas()},
             900, what, poll=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/scaleout_local_cpu"))
    ap.add_argument("--port", type=int, default=8430)
    ap.add_argument("--workers", type=int, default=4)
    opts = ap.parse_args()
    import ray
    from ray import serve

    from cluster.serving.app import build_app

    base = f"http://127.0.0.1:{opts.port}"
    args = tiny_args(tiny_qwen2(), MODEL, replicas={
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                        "upscale_delay_s": 2, "downscale_delay_s": 20},
        "max_ongoing_requests": 4, "health_check_period_s": 2, "health_check_timeout_s": 10,
        "graceful_shutdown_timeout_s": 5,
    }, request_timeout_s=120, retry_attempts=2)
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING")
    events: list[tuple[float, str]] = []
    replica_series: list[tuple[float, int]] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": opts.port})
        t_boot = time.monotonic()
        serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
        wait_healthy(base, 900)
        boot_s = time.monotonic() - t_boot
        t0 = time.monotonic()
        t0_wall = time.time()
        stop_sampler = threading.Event()

        def sample() -> None:
            while not stop_sampler.is_set():
                try:
                    replica_series.append((time.monotonic() - t0, n_running()))
                except Exception:
                    pass
                stop_sampler.wait(2)

        threading.Thread(target=sample, daemon=True).start()

        def mark(what: str) -> float:
            t = time.monotonic() - t0
            events.append((t, what))
            print(f"{t:7.1f}s {what}", flush=True)
            return t

        phases: dict[str, Any] = {}
        answers: list[tuple[float, int]] = []
        mark("load starts")
        with Load(base, MODEL, workers=opts.workers) as load:
            wait_for(lambda: n_running() == 2, 900, "second replica RUNNING under load", poll=1)
            t_up = mark("second replica RUNNING")
            phases["scale_up"] = load.window()
            load.wait_served(40)  # both replicas take traffic
            phases["two_replicas"] = load.window()
            victim = next(r for r in replicas() if str(r["state"]) == "RUNNING")
            t_kill = mark("replica actor killed")
            kill_and_wait_replaced(victim, running=2, what="replacement RUNNING")
            t_back = mark("replacement RUNNING")
            phases["replica_killed"] = load.window()
            load.wait_served(40)
            phases["after_recovery"] = load.window()
        answers += load.events
        t_idle = mark("load stops")
        wait_for(lambda: len(replicas()) == 1 and n_running() == 1, 300, "scaled down to 1", poll=1)
        t_down = mark("scaled down to 1")
        with Load(base, MODEL, workers=1) as load:
            load.wait_served(5)
            load.window()
            only = replicas()[0]
            t_kill2 = mark("last replica killed")
            kill_and_wait_replaced(only, running=1, what="replica restarted")
            t_back2 = mark("replica restarted")
            phases["no_replica"] = load.window()
            load.wait_served(10)
            phases["after_restart"] = load.window()
        answers += load.events
        mark("end")
        stop_sampler.set()
        result = {
            **provenance(),
            "machine": f"{os.cpu_count()} cores (shared), CPU vLLM, tiny 2-layer Qwen2",
            "workers": opts.workers, "app_boot_s": round(boot_s, 1),
            "seconds_to_second_replica": round(t_up, 1),
            "seconds_kill_to_replacement": round(t_back - t_kill, 1),
            "seconds_idle_to_one_replica": round(t_down - t_idle, 1),
            "seconds_last_kill_to_restart": round(t_back2 - t_kill2, 1),
            "phases": {name: asdict(counts) for name, counts in phases.items()},
            "events": events, "replicas_running": replica_series,
            # (seconds since load start, final status) of every request, for the timeline.
            "answers": sorted((round(t - t0_wall, 3), status) for t, status in answers),
        }
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("answers", "replicas_running")}, indent=1))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    answers = result["answers"]
    end = max((t for t, _ in answers), default=1.0)
    width = 5.0
    bins = int(end // width) + 1
    outcome = {"200": [0] * bins, "503 (Retry-After)": [0] * bins, "other failure": [0] * bins}
    for t_end, status in answers:
        key = "200" if status == 200 else "503 (Retry-After)" if status == 503 else "other failure"
        outcome[key][int(t_end // width)] += 1
    xs = [i * width for i in range(bins)]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    colours = {"200": "tab:green", "503 (Retry-After)": "tab:orange", "other failure": "tab:red"}
    for key, ys in outcome.items():
        ax.step(xs, [y / width for y in ys], where="post", label=f"answers/s: {key}", color=colours[key])
    ax.set_xlabel("seconds since load started")
    ax.set_ylabel("answers per second (5 s bins)")
    ax2 = ax.twinx()
    rs = result["replicas_running"]
    ax2.step([t for t, _ in rs], [n for _, n in rs], where="post", color="tab:blue", label="replicas RUNNING")
    ax2.set_ylim(0, 3)
    ax2.set_ylabel("replicas RUNNING")
    for t, what in result["events"]:
        ax.axvline(t, color="grey", lw=0.8, ls="--")
        ax.text(t, ax.get_ylim()[1] * 0.98, what, rotation=90, va="top", ha="right", fontsize=7)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    ax.set_title("fleetserve scale-out and faults, local Ray cluster (CPU vLLM, tiny model)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
