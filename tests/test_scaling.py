"""Autoscaling and faults on one local Ray cluster, under load from the real ``openai`` client.

One app (tiny text model, real vLLM on CPU) with autoscaling 1..2 and a small
target; the tests run in order against it:

1. load -> Serve starts a second replica;
2. a replica actor is killed under load -> Serve restarts it while the other
   keeps serving; the ingress retries what failed before a byte was sent;
3. idle -> back to one replica;
4. the last replica killed -> clients get 503 + Retry-After at once (not a
   hang), and every request succeeds again once Serve restarted it.

The load client counts what it sent, what succeeded, what it retried (after a
503 it waits Retry-After, as a client should) and what failed; the counts are
printed and written to ``$FLEETSERVE_SCALE_REPORT`` (JSON) when set. No
request may hang: each has a 60 s client timeout, and any timeout fails the test.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest

import waiting
from loadgen import CLIENT_TIMEOUT_S, Counts, Load, add, ingress_counters
from tinyqwen2 import local_ray, tiny_args, tiny_qwen2
from waiting import wait_healthy

# A soak run (about 15 min on 2 cores): not in the default run, whose
# tests/test_fleet_hosts.py covers scale-up, scale-down, a replica lost under
# load while another serves, and losing the last replica, on emulated hosts.
# Run it with: bash scripts/test.sh -m soak tests/test_scaling.py
pytestmark = [pytest.mark.slow, pytest.mark.soak]

PORT = 8420
BASE = f"http://127.0.0.1:{PORT}"
MODEL = "tiny-text"
APP = "scaling"
DEPLOYMENT = f"FleetLLMServer:{MODEL}"
REPORT: dict[str, dict] = {}


def llm_replicas() -> list[dict]:
    from cluster.serving.status import fetch_serve_details

    deps = fetch_serve_details()["applications"][APP]["deployments"]
    return deps[DEPLOYMENT]["replicas"]


def running() -> list[dict]:
    return [r for r in llm_replicas() if str(r["state"]) == "RUNNING"]


def wait_for(pred, timeout: float, what: str) -> float:
    return waiting.wait_for(pred, timeout, what, poll=2.0,
                            state=lambda: f"replicas: {[(r['replica_id'], r['state']) for r in llm_replicas()]}")


def record(name: str, counts: Counts, **extra: object) -> None:
    REPORT[name] = {**asdict(counts), **extra}
    print(f"\n[{name}] {json.dumps(REPORT[name])}")
    path = os.environ.get("FLEETSERVE_SCALE_REPORT")
    if path:
        sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
        from provenance import provenance

        with open(path, "w") as fh:
            json.dump({**provenance(), **REPORT}, fh, indent=1)


def kill_replica(replica: dict) -> None:
    import ray

    actor = ray.get_actor(replica["actor_name"], namespace="serve")
    ray.kill(actor, no_restart=True)


@pytest.fixture(scope="module")
def app():
    from ray import serve

    from cluster.serving.app import build_app

    args = tiny_args(tiny_qwen2(), MODEL, replicas={
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                        "upscale_delay_s": 2, "downscale_delay_s": 20},
        "max_ongoing_requests": 4,
        # Find a dead replica in seconds, not Serve's default 10 s + 30 s.
        "health_check_period_s": 2, "health_check_timeout_s": 10, "graceful_shutdown_timeout_s": 5,
    }, request_timeout_s=120, retry_attempts=2)
    with local_ray():
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        t0 = time.monotonic()
        serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
        wait_healthy(BASE, 900)
        print(f"app ready in {time.monotonic() - t0:.0f}s")
        yield
        serve.shutdown()


def test_1_scales_up_under_load(app):
    assert len(running()) == 1
    with Load(BASE, MODEL, workers=4) as load:
        took = wait_for(lambda: len(running()) == 2, 900, "second replica under load")
        load.wait_served(8)  # requests keep succeeding with both replicas up
        counts = load.window()
    record("scale_up", counts, seconds_to_second_replica=round(took, 1))
    assert counts.succeeded > 0 and counts.failed == 0 and counts.timeouts == 0
    assert counts.max_latency_s < CLIENT_TIMEOUT_S


def test_2_killed_replica_is_restarted_while_the_other_serves(app):
    before_ingress = ingress_counters(BASE)
    replicas = running()
    assert len(replicas) == 2
    victim, survivor = replicas
    with Load(BASE, MODEL, workers=4) as load:
        load.wait_served(4)
        load.window()
        t_kill = time.monotonic()
        kill_replica(victim)
        # The survivor keeps serving while Serve notices and replaces the victim.
        wait_for(lambda: victim["replica_id"] not in {r["replica_id"] for r in llm_replicas()}, 120,
                 "Serve notices the killed replica")
        during = load.window()
        took = wait_for(lambda: len(running()) >= 2 or (len(running()) == 1 and running()[0]["replica_id"]
                        != survivor["replica_id"]), 900, "killed replica replaced")
        during_restart = load.window()
    after_ingress = ingress_counters(BASE)
    ingress_retried = after_ingress.get("retried", 0) - before_ingress.get("retried", 0)
    total = add(during, during_restart)
    record("replica_killed", total, ingress_retried=ingress_retried,
           seconds_to_replacement=round(time.monotonic() - t_kill, 1), wait_s=round(took, 1))
    assert total.succeeded > 0, "the surviving replica must keep serving"
    assert total.timeouts == 0 and total.max_latency_s < CLIENT_TIMEOUT_S
    # Failures are only what no retry can save (an answer that had started streaming).
    assert total.failed <= 4, total
    # After recovery every request succeeds again.
    load = Load(BASE, MODEL, workers=1)
    assert [load.one(i) for i in range(6)] == [200] * 6


def test_3_idle_scales_back_to_one(app):
    took = wait_for(lambda: len(running()) == 1 and len(llm_replicas()) == 1, 300, "scale down when idle")
    REPORT.setdefault("scale_down", {})["seconds_idle_to_one_replica"] = round(took, 1)
    print(f"\n[scale_down] {took:.0f}s")


def test_4_no_live_replica_gives_503_with_retry_after_not_a_hang(app):
    (only,) = running()
    kill_replica(only)
    codes, latencies, retry_after = [], [], []

    def probe() -> int:
        """One request; its status, latency and Retry-After recorded."""
        t0 = time.monotonic()
        r = httpx.post(f"{BASE}/v1/chat/completions", timeout=CLIENT_TIMEOUT_S,
                       json={"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "the a"}]})
        latencies.append(time.monotonic() - t0)
        codes.append(r.status_code)
        if r.status_code == 503:
            retry_after.append(r.headers.get("retry-after"))
            assert "no replica" in r.json()["error"]["message"]
        return r.status_code

    # Probe until the ingress has answered 503 three times (or 40 probes, ~20 s, if Serve restarts the
    # replica sooner); the asserts below say whether 503s came, at once and with Retry-After.
    waiting.wait_for(lambda: probe() == 503 and codes.count(503) >= 3 or len(codes) >= 40, 120,
                     "503s while no replica is alive", poll=0.5, state=lambda: codes)
    REPORT["no_replica"] = {"codes": {str(c): codes.count(c) for c in set(codes)},
                            "max_latency_s": round(max(latencies), 2)}
    print(f"\n[no_replica] {REPORT['no_replica']}")
    assert 503 in codes and all(ra and int(ra) > 0 for ra in retry_after)
    assert set(codes) <= {200, 503}, codes
    assert max(latencies) < 15, "a request waited for a replica instead of getting 503"
    # Serve restarts the replica (min_replicas=1); then every request succeeds again.
    took = wait_for(lambda: len(running()) == 1, 900, "replica restarted after losing the last one")
    wait_healthy(BASE, 120)
    load = Load(BASE, MODEL, workers=1)
    assert [load.one(i) for i in range(6)] == [200] * 6
    REPORT["no_replica"]["seconds_to_restart"] = round(took, 1)
    record("no_replica_final", Counts(), **REPORT["no_replica"])
