"""Scale-out and fault figures on one local Ray cluster (tiny text model, real vLLM on CPU).

Drives the OpenAI endpoint with closed-loop load from the real ``openai`` client
while the cluster goes through: autoscale 1 -> 2 replicas under load, one
replica actor killed under load (Serve restarts it), idle scale-down to 1, and
the last replica killed (clients must get 503 + Retry-After, then recover).
Every request is recorded (start, end, status, attempt), so the figures are:

* seconds from load start to the second replica RUNNING and to its first answer
  share (requests/s per window),
* requests sent / succeeded / retried (client, after 503 + Retry-After) /
  failed around each fault, and the longest request (no hangs),
* a PNG timeline: answered requests/s by outcome, replicas RUNNING, events.

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
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from tinyqwen2 import tiny_args, tiny_qwen2, wait_healthy  # noqa: E402

MODEL, APP = "tiny-text", "scaleout"
DEPLOYMENT = f"FleetLLMServer:{MODEL}"


class Recorder:
    """Closed-loop load; one record per attempt: (t_start, t_end, status, request index, attempt)."""

    def __init__(self, base: str, workers: int, t0: float, timeout: float = 60.0):
        from openai import OpenAI

        self.client = OpenAI(base_url=f"{base}/v1", api_key="none", timeout=timeout, max_retries=0)
        self.workers, self.t0 = workers, t0
        self.records: list[tuple[float, float, int, int, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._next = 0

    def _one(self, idx: int) -> None:
        import openai

        for attempt in range(4):
            start = time.monotonic()
            retry_after = None
            try:
                self.client.chat.completions.create(
                    model=MODEL, max_tokens=48, messages=[{"role": "user", "content": f"the a of and w{idx % 400}"}])
                status = 200
            except openai.APIStatusError as exc:
                status, retry_after = exc.status_code, exc.response.headers.get("retry-after")
            except openai.APITimeoutError:
                status = 0
            except openai.APIConnectionError:
                status = -1
            with self._lock:
                self.records.append((start - self.t0, time.monotonic() - self.t0, status, idx, attempt))
            if status == 503 and retry_after and attempt < 3:
                time.sleep(min(float(retry_after), 2.0))
                continue
            return

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                idx, self._next = self._next, self._next + 1
            self._one(idx)

    def start(self, workers: int | None = None) -> None:
        self._stop.clear()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers or self.workers)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=300)


def replicas() -> list[dict[str, Any]]:
    from cluster.serving.status import fetch_serve_details

    return fetch_serve_details()["applications"][APP]["deployments"][DEPLOYMENT]["replicas"]


def n_running() -> int:
    return sum(1 for r in replicas() if str(r["state"]) == "RUNNING")


def counts(records: list, t_from: float, t_to: float) -> dict[str, Any]:
    """Per request (all attempts of one index) that started in [t_from, t_to)."""
    by_idx: dict[int, list] = {}
    for rec in records:
        by_idx.setdefault(rec[3], []).append(rec)
    sent = succeeded = retried = failed = 0
    longest = 0.0
    fail_codes: dict[str, int] = {}
    for recs in by_idx.values():
        recs.sort(key=lambda r: r[4])
        if not (t_from <= recs[0][0] < t_to):
            continue
        sent += 1
        retried += len(recs) - 1
        longest = max(longest, max(r[1] - r[0] for r in recs))
        if recs[-1][2] == 200:
            succeeded += 1
        else:
            failed += 1
            fail_codes[str(recs[-1][2])] = fail_codes.get(str(recs[-1][2]), 0) + 1
    return {"sent": sent, "succeeded": succeeded, "retried": retried, "failed": failed,
            "failed_by_status": fail_codes, "longest_attempt_s": round(longest, 2)}


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
        rec = Recorder(base, opts.workers, t0)
        stop_sampler = threading.Event()

        def sample() -> None:
            while not stop_sampler.is_set():
                try:
                    replica_series.append((time.monotonic() - t0, n_running()))
                except Exception:
                    pass
                time.sleep(2)

        threading.Thread(target=sample, daemon=True).start()

        def mark(what: str) -> float:
            t = time.monotonic() - t0
            events.append((t, what))
            print(f"{t:7.1f}s {what}", flush=True)
            return t

        def wait(pred, timeout: float) -> None:
            end = time.monotonic() + timeout
            while not pred() and time.monotonic() < end:
                time.sleep(1)

        mark("load starts")
        rec.start()
        wait(lambda: n_running() == 2, 900)
        t_up = mark("second replica RUNNING")
        time.sleep(20)
        victim = next(r for r in replicas() if str(r["state"]) == "RUNNING")
        t_kill = mark("replica actor killed")
        ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
        wait(lambda: n_running() == 2 and victim["replica_id"] not in {r["replica_id"] for r in replicas()}, 900)
        t_back = mark("replacement RUNNING")
        time.sleep(20)
        rec.stop()
        t_idle = mark("load stops")
        wait(lambda: len(replicas()) == 1 and n_running() == 1, 300)
        t_down = mark("scaled down to 1")
        rec.start(1)
        time.sleep(5)
        only = replicas()[0]
        t_kill2 = mark("last replica killed")
        ray.kill(ray.get_actor(only["actor_name"], namespace="serve"), no_restart=True)
        wait(lambda: n_running() == 1 and only["replica_id"] not in {r["replica_id"] for r in replicas()}, 900)
        t_back2 = mark("replica restarted")
        time.sleep(15)
        rec.stop()
        t_end = mark("end")
        stop_sampler.set()
        records = list(rec.records)
        result = {
            "machine": f"{os.cpu_count()} cores (shared), CPU vLLM, tiny 2-layer Qwen2",
            "workers": opts.workers, "app_boot_s": round(boot_s, 1),
            "seconds_to_second_replica": round(t_up, 1),
            "seconds_kill_to_replacement": round(t_back - t_kill, 1),
            "seconds_idle_to_one_replica": round(t_down - t_idle, 1),
            "seconds_last_kill_to_restart": round(t_back2 - t_kill2, 1),
            "phases": {
                "scale_up": counts(records, 0, t_up),
                "two_replicas": counts(records, t_up, t_kill),
                "replica_killed": counts(records, t_kill, t_back),
                "after_recovery": counts(records, t_back, t_idle),
                "no_replica": counts(records, t_kill2, t_back2),
                "after_restart": counts(records, t_back2, t_end),
            },
            "events": events, "replicas_running": replica_series,
            "records": [list(r) for r in records],
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
    print(json.dumps({k: v for k, v in result.items() if k not in ("records", "replicas_running")}, indent=1))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = result["records"]
    end = max((r[1] for r in records), default=1.0)
    width = 5.0
    bins = int(end // width) + 1
    outcome = {"200": [0] * bins, "503 (Retry-After)": [0] * bins, "other failure": [0] * bins}
    for _, t_end, status, _, _ in records:
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
