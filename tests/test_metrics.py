"""vLLM engine metrics and the FlagGems op report on Ray's Prometheus endpoint.

One app (the tiny text model, real vLLM on CPU) on a local Ray cluster whose
node exports metrics on a known port; the tests send real requests, scrape
``/metrics`` and check that

* vLLM's engine series (running/waiting, KV cache, TTFT, TPOT, tokens) are there
  for the served model and carry the Serve replica's id,
* fleetserve's FlagGems series carry Serve's deployment and replica labels,
* every series the Grafana dashboard queries exists,
* ``cluster.serving.status`` summarises the deployment from the same sources.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tinyqwen2 import local_ray, tiny_args, tiny_qwen2, wait_healthy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PORT, METRICS_PORT = 8410, 8411
BASE = f"http://127.0.0.1:{PORT}"
MODEL = "tiny-text"
DEPLOYMENT = f"FleetLLMServer:{MODEL}"


def scrape() -> dict[str, list]:
    """Metric family name -> samples, from this node's Prometheus endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30).text
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(family.name, []).append(sample)
            if sample.name != family.name:  # histogram/counter parts: *_bucket, *_count, *_total
                out.setdefault(sample.name, []).append(sample)
    return out


@pytest.fixture(scope="module")
def app():
    from ray import serve

    from cluster.serving.app import build_app

    model = tiny_qwen2()
    with local_ray(_metrics_export_port=METRICS_PORT):
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        t0 = time.monotonic()
        serve.run(build_app(tiny_args(model, MODEL)), name="metrics", route_prefix="/", blocking=False)
        wait_healthy(BASE, 900)
        print(f"app ready in {time.monotonic() - t0:.0f}s")
        yield
        serve.shutdown()


@pytest.fixture(scope="module")
def scraped(app):
    """Scrape after real traffic (plain and streamed), once Ray exported it."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{BASE}/v1", api_key="none", timeout=120, max_retries=0)
    for i in range(4):
        client.chat.completions.create(model=MODEL, max_tokens=16,
                                       messages=[{"role": "user", "content": f"the a of w{i}"}])
    list(client.chat.completions.create(model=MODEL, max_tokens=16, stream=True,
                                        messages=[{"role": "user", "content": "to in is"}]))
    # Each process exports on its own period (the proxy's request counters can lag the
    # engine's by many seconds), so wait for every series a test below looks at.
    wanted = dashboard_series() | {"ray_fleetserve_flaggems_ops", "ray_vllm_time_to_first_token_seconds_count"}
    deadline = time.monotonic() + 180
    while True:
        samples = scrape()
        gen = [s for s in samples.get("ray_vllm_generation_tokens_total", []) if s.labels.get("model_name") == MODEL]
        missing = sorted(n for n in wanted if n not in samples and f"{n}_count" not in samples)
        if gen and sum(s.value for s in gen) >= 5 * 16 and not missing:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"series not exported in time: missing {missing}; generation tokens for "
                                 f"{MODEL}: {sum(s.value for s in gen)} (want >= {5 * 16})")
        time.sleep(3)


def dashboard_series() -> set[str]:
    """Every series the Grafana dashboard queries."""
    from test_deployments import dashboard_metric_names

    return set(dashboard_metric_names(json.loads((ROOT / "deployments/grafana/fleetserve.json").read_text())))


def _serve_replica_ids() -> set[str]:
    from cluster.serving.status import fetch_serve_details

    details = fetch_serve_details()
    deps = details["applications"]["metrics"]["deployments"]
    return {r["replica_id"] for r in deps[DEPLOYMENT]["replicas"]}


def test_vllm_engine_series_with_replica_id(scraped):
    from cluster.serving.metrics import VLLM_SERIES

    replicas = _serve_replica_ids()
    assert len(replicas) == 1
    for key, name in VLLM_SERIES.items():
        family = scraped.get(name) or scraped.get(name + "_count")
        assert family, f"{key}: {name} missing from the scrape"
        mine = [s for s in family if s.labels.get("model_name") == MODEL]
        assert mine, f"{name} has no sample for model_name={MODEL}"
        assert {s.labels["ReplicaId"] for s in mine} <= replicas, (name, mine[0].labels)
    ttft = [s for s in scraped["ray_vllm_time_to_first_token_seconds_count"] if s.labels["model_name"] == MODEL]
    assert sum(s.value for s in ttft) >= 5


def test_flaggems_series_with_deployment_and_replica_labels(scraped):
    from cluster.kernels import FlagGemsConfig

    replicas = _serve_replica_ids()
    ops = [s for s in scraped["ray_fleetserve_flaggems_ops"] if s.labels.get("deployment") == DEPLOYMENT]
    assert ops, scraped["ray_fleetserve_flaggems_ops"][:2]
    assert {s.labels["replica"] for s in ops} == replicas
    assert {s.labels["application"] for s in ops} == {"metrics"}
    # FlagGems is off in this deployment (a CPU host): every op of the default set runs vLLM's stock kernel.
    assert {s.labels["op"] for s in ops if s.value > 0} == set(FlagGemsConfig().selected_ops())
    assert {s.labels["status"] for s in ops if s.value > 0} == {"stock"}
    state = {s.labels["status"]: s.value for s in scraped["ray_fleetserve_flaggems_status"]
             if s.labels.get("deployment") == DEPLOYMENT}
    assert state["disabled"] == 1 and state["active"] == 0


def test_replica_info_joins_vllm_to_serve_labels(scraped):
    (replica,) = _serve_replica_ids()
    # Ray keeps exporting a dead worker's last values for a while, so look at the live replica.
    info = [s for s in scraped["ray_fleetserve_replica_info"]
            if s.labels.get("deployment") == DEPLOYMENT and s.labels.get("replica") == replica]
    assert len(info) == 1
    labels = info[0].labels
    assert labels["ReplicaId"] == replica and labels["model"] == MODEL and labels["node_ip"]
    running = [s for s in scraped["ray_vllm_num_requests_running"] if s.labels.get("model_name") == MODEL]
    assert replica in {s.labels["ReplicaId"] for s in running}


def test_grafana_dashboard_series_exist(scraped):
    missing = sorted(n for n in dashboard_series() if n not in scraped and f"{n}_count" not in scraped)
    assert not missing, f"dashboard queries series the cluster does not export: {missing}"


def test_status_summary(scraped):
    from rich.console import Console

    from cluster.serving.status import fetch_serve_details, metrics_endpoints, scrape_replica_load, serve_table, summarize

    endpoints = metrics_endpoints()
    assert f"127.0.0.1:{METRICS_PORT}" in " ".join(endpoints) or any(f":{METRICS_PORT}/" in e for e in endpoints)
    rows = summarize(fetch_serve_details(), scrape_replica_load(endpoints))
    llm = next(r for r in rows if r.deployment == DEPLOYMENT)
    assert llm.app == "metrics" and llm.status == "HEALTHY"
    assert llm.running_replicas == 1 and llm.target == 1 and sum(llm.nodes.values()) == 1
    assert llm.running == 0 and llm.waiting == 0 and llm.ongoing == 0
    console = Console(record=True, width=200)
    console.print(serve_table(rows))
    text = console.export_text()
    assert DEPLOYMENT in text and "FleetIngress" in text and "1/1" in text
    # The JSON form (what `fleetserve status` gets back from the head over SSH) renders the same rows.
    from cluster.serving.status import collect_serve_summary, table_from_json

    summary = json.loads(json.dumps(collect_serve_summary()))
    assert {r["deployment"] for r in summary} == {r.deployment for r in rows}
    console.print(table_from_json(summary))
