"""vLLM engine metrics and the FlagGems op report on Ray's Prometheus endpoint.

One app (the tiny text model, real vLLM on CPU) on a local Ray cluster whose
node exports metrics on a known port; the tests send real requests, scrape
``/metrics`` and check that

* vLLM's engine series (running/waiting, KV cache, TTFT, TPOT, tokens) are there
  for the served model and carry the Serve replica's id,
* fleetserve's FlagGems series carry Serve's deployment and replica labels,
* every series the Grafana dashboard queries exists,
* vLLM's scheduler gauges (running, waiting, KV cache) are there with sane values
  under load and stay there while the replica idles,
* ``cluster.serving.status`` summarises the deployment from the same sources,
* ``fleetserve prometheus`` (Debian's Prometheus) scrapes the node through the
  service-discovery file Ray's dashboard writes, and the dashboard sees it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tinyqwen2 import local_ray, tiny_args, tiny_qwen2
from waiting import REQUEST_TIMEOUT_S, wait_for, wait_healthy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PORT, METRICS_PORT, DASHBOARD_PORT, PROMETHEUS_PORT = 8410, 8411, 8412, 8413
BASE = f"http://127.0.0.1:{PORT}"
PROMETHEUS_URL = f"http://127.0.0.1:{PROMETHEUS_PORT}"
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
    # With the dashboard: it writes Prometheus's service-discovery file, and its Metrics page
    # asks the Prometheus that RAY_PROMETHEUS_HOST names (read when the dashboard starts).
    saved = os.environ.get("RAY_PROMETHEUS_HOST")
    os.environ["RAY_PROMETHEUS_HOST"] = PROMETHEUS_URL
    try:
        # Every process exports its metrics each 2 s instead of Ray's 10 s: the waits below (series
        # exported, gauges busy, then idle for three export periods) follow the period.
        with local_ray(_metrics_export_port=METRICS_PORT, include_dashboard=True, dashboard_port=DASHBOARD_PORT,
                       _system_config={"metrics_report_interval_ms": 2000}):
            serve.start(http_options={"host": "127.0.0.1", "port": PORT})
            t0 = time.monotonic()
            serve.run(build_app(tiny_args(model, MODEL)), name="metrics", route_prefix="/", blocking=False)
            wait_healthy(BASE, 900)
            print(f"app ready in {time.monotonic() - t0:.0f}s")
            yield
            serve.shutdown()
    finally:
        if saved is None:
            os.environ.pop("RAY_PROMETHEUS_HOST", None)
        else:
            os.environ["RAY_PROMETHEUS_HOST"] = saved


@pytest.fixture(scope="module")
def scraped(app):
    """Scrape after real traffic (plain and streamed), once Ray exported it."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{BASE}/v1", api_key="none", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    for i in range(4):
        client.chat.completions.create(model=MODEL, max_tokens=16,
                                       messages=[{"role": "user", "content": f"the a of w{i}"}])
    list(client.chat.completions.create(model=MODEL, max_tokens=16, stream=True,
                                        messages=[{"role": "user", "content": "to in is"}]))
    # Each process exports on its own period (the proxy's request counters can lag the
    # engine's by many seconds), so wait for every series a test below looks at.
    wanted = dashboard_series() | {"ray_fleetserve_flaggems_ops", "ray_vllm_time_to_first_token_seconds_count"}
    seen: dict = {}

    def exported() -> bool:
        seen["samples"] = samples = scrape()
        gen = [s for s in samples.get("ray_vllm_generation_tokens_total", []) if s.labels.get("model_name") == MODEL]
        seen["missing"] = missing = sorted(n for n in wanted if n not in samples and f"{n}_count" not in samples)
        seen["tokens"] = sum(s.value for s in gen)
        return bool(gen) and seen["tokens"] >= 5 * 16 and not missing

    wait_for(exported, 180, "every series exported", poll=3,
             state=lambda: f"missing {seen.get('missing')}; generation tokens for {MODEL}: {seen.get('tokens')} "
                           f"(want >= {5 * 16})")
    return seen["samples"]


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


ENGINE_GAUGES = {"running": "ray_vllm_num_requests_running", "waiting": "ray_vllm_num_requests_waiting",
                 "kv_cache": "ray_vllm_kv_cache_usage_perc"}


def engine_gauges(replica: str) -> dict[str, float | None]:
    """vLLM's scheduler gauges of one replica as scraped now (None: the series is absent)."""
    samples = scrape()
    out: dict[str, float | None] = {}
    for key, name in ENGINE_GAUGES.items():
        mine = [s.value for s in samples.get(name, [])
                if s.labels.get("model_name") == MODEL and s.labels.get("ReplicaId") == replica]
        out[key] = sum(mine) if mine else None
    return out


def llm_row() -> dict:
    from cluster.serving.status import collect_serve_summary

    return next(r for r in collect_serve_summary() if r["deployment"] == DEPLOYMENT)


def test_engine_gauges_under_load_and_while_idle(scraped):
    """The gauges `fleetserve status` shows: real values under load, zeros (not absent) when idle."""
    import ray
    from openai import OpenAI

    (replica,) = _serve_replica_ids()
    max_num_seqs = 8  # tiny_args' engine_args
    client = OpenAI(base_url=f"{BASE}/v1", api_key="none", timeout=300, max_retries=0)
    stop = threading.Event()

    def load(i: int) -> None:
        while not stop.is_set():  # ignore_eos: every request decodes its max_tokens
            client.chat.completions.create(model=MODEL, max_tokens=48, extra_body={"ignore_eos": True},
                                           messages=[{"role": "user", "content": f"the a of w{i}"}])

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(max_num_seqs + 2)]
    for t in threads:
        t.start()
    try:
        seen: dict = {}

        def busy() -> bool:
            seen["gauges"], seen["row"] = gauges, row = engine_gauges(replica), llm_row()
            return (gauges["running"] or 0) >= 1 and (gauges["kv_cache"] or 0) > 0 and (row["running"] or 0) >= 1

        wait_for(busy, 240, "a busy engine under load", state=lambda: f"scrape {seen.get('gauges')}, "
                 f"status {seen.get('row')}")
        gauges, row = seen["gauges"], seen["row"]
    finally:
        stop.set()
        for t in threads:
            t.join(300)
    print(f"under load: {gauges}; status row running={row['running']} waiting={row['waiting']} "
          f"kv={row['kv_cache']}")
    assert 1 <= gauges["running"] <= max_num_seqs and gauges["waiting"] is not None and gauges["waiting"] >= 0
    assert 0 < gauges["kv_cache"] <= 1
    assert row["waiting"] is not None and 0 < row["kv_cache"] <= 1

    # Idle: the engine's last step may be exported late, so wait for zeros first; then the series
    # must stay through more than Ray's gauge TTL (two export intervals), as an idle replica does.
    wait_for(lambda: engine_gauges(replica) == {"running": 0, "waiting": 0, "kv_cache": 0}, 120,
             "engine idle on the endpoint", state=lambda: engine_gauges(replica))
    idle_for = 3 * max(ray._config.metrics_report_interval_ms(), 1000) / 1000
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < idle_for:
        gauges = engine_gauges(replica)
        assert gauges == {"running": 0, "waiting": 0, "kv_cache": 0}, \
            f"{time.monotonic() - idle_since:.0f}s into idling: {gauges}"
        time.sleep(2)
    row = llm_row()
    assert (row["running"], row["waiting"], row["kv_cache"], row["ongoing"]) == (0, 0, 0, 0), row


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


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="no prometheus binary (scripts/setup-prometheus.sh installs Debian's package)")
def test_prometheus_scrapes_the_cluster_through_rays_service_discovery(scraped, tmp_path):
    """`fleetserve prometheus` on the head: every node found through Ray's file, the app's series queryable."""
    import ray

    from cluster.commands.observe_cmds import SERVICE_DISCOVERY_FILE

    # This cluster's own file (the /tmp/ray link is shared with any other Ray on this machine).
    sd = Path(ray._private.worker._global_node.get_session_dir_path()) / SERVICE_DISCOVERY_FILE
    wait_for(lambda: sd.is_file() and f":{METRICS_PORT}" in sd.read_text(), 60,
             f"the dashboard listing the node in {sd}")
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("fleetserve")), "prometheus", "--sd-file", str(sd),
                             "--dir", str(tmp_path / "prom"), "--listen", f"127.0.0.1:{PROMETHEUS_PORT}",
                             "--scrape-interval", "2s"], stdout=log, stderr=subprocess.STDOUT)
    try:
        query = f'ray_vllm_generation_tokens_total{{model_name="{MODEL}"}}'
        result: list = []

        def queryable() -> bool:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            r = httpx.get(f"{PROMETHEUS_URL}/api/v1/query", params={"query": query}, timeout=5)
            result[:] = r.json()["data"]["result"] if r.status_code == 200 else []
            return bool(result)

        wait_for(queryable, 120, f"Prometheus answering {query}",
                 state=lambda: (tmp_path / "prometheus.log").read_text()[-2000:])
        assert float(result[0]["value"][1]) > 0 and result[0]["metric"]["ReplicaId"] in _serve_replica_ids()
        # Every target came from Ray's file, and the node's endpoint is scraped.
        targets = httpx.get(f"{PROMETHEUS_URL}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        listed = set(json.loads(sd.read_text())[0]["targets"])
        assert {t["labels"]["instance"] for t in targets} == listed
        node = next(t for t in targets if t["labels"]["instance"].endswith(f":{METRICS_PORT}"))
        assert node["health"] == "up", node
        serve_series = httpx.get(f"{PROMETHEUS_URL}/api/v1/query", timeout=5, params={
            "query": 'ray_serve_deployment_replica_healthy{application="metrics"}'}).json()["data"]["result"]
        assert {s["metric"]["deployment"] for s in serve_series} >= {DEPLOYMENT}
        # The dashboard's Metrics page asks this Prometheus (RAY_PROMETHEUS_HOST) and finds it.
        health = httpx.get(f"http://127.0.0.1:{DASHBOARD_PORT}/api/prometheus_health", timeout=10)
        assert health.status_code == 200, health.text
    finally:
        proc.terminate()  # the command exec'd Prometheus: this PID is Prometheus itself
        proc.wait(60)
        log.close()
    assert proc.returncode == 0, (tmp_path / "prometheus.log").read_text()[-2000:]
