"""Observability without a cluster: ``fleetserve prometheus``'s config and errors, the status scrape.

The live paths (Prometheus scraping a running app through Ray's service-discovery
file, the gauges of a real engine) are tested in tests/test_metrics.py.
"""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import threading

import pytest
import yaml
from typer.testing import CliRunner

from cluster.cli import app
from cluster.commands.observe_cmds import SERVICE_DISCOVERY_FILE, prometheus_config

runner = CliRunner()


def test_service_discovery_file_name_is_rays():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    assert SERVICE_DISCOVERY_FILE == PROMETHEUS_SERVICE_DISCOVERY_FILE


def test_print_only_writes_a_config_prometheus_accepts(tmp_path):
    sd = tmp_path / "ray" / SERVICE_DISCOVERY_FILE
    sd.parent.mkdir()
    sd.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": ["10.0.0.1:8080", "10.0.0.2:8080"]}]))
    out = tmp_path / "prom"
    result = runner.invoke(app, ["prometheus", "--ray-temp-dir", str(sd.parent), "--dir", str(out),
                                 "--listen", "0.0.0.0:9091", "--scrape-interval", "5s", "--print-only"])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((out / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == [str(sd)]
    assert config["global"]["scrape_interval"] == "5s"
    assert f"--config.file={out / 'prometheus.yml'}" in result.output
    assert "--web.listen-address=0.0.0.0:9091" in result.output
    # Not the dashboard's default address: say how the dashboard finds it.
    assert "RAY_PROMETHEUS_HOST=http://localhost:9091" in result.output
    promtool = shutil.which("promtool")
    if promtool:  # Debian's prometheus package ships it (scripts/setup-prometheus.sh)
        check = subprocess.run([promtool, "check", "config", str(out / "prometheus.yml")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_missing_service_discovery_file_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["prometheus", "--ray-temp-dir", str(tmp_path), "--dir", str(tmp_path / "p")])
    assert result.exit_code == 1
    assert SERVICE_DISCOVERY_FILE in result.output and "ray.temp_dir" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("interval", ["10", "0s", "1.5s", "10s; rm", ""])
def test_bad_scrape_interval_is_refused(tmp_path, interval):
    from cluster.errors import FleetserveError

    with pytest.raises(FleetserveError, match="scrape-interval"):
        prometheus_config(tmp_path / SERVICE_DISCOVERY_FILE, interval)


# One replica with two engines (data parallel), as Ray's endpoint exposes vLLM's and Serve's series.
SCRAPE = """\
# HELP ray_vllm_num_requests_running Number of requests in model execution batches.
# TYPE ray_vllm_num_requests_running gauge
ray_vllm_num_requests_running{ReplicaId="r1",engine="0",model_name="m"} 3.0
ray_vllm_num_requests_running{ReplicaId="r1",engine="1",model_name="m"} 2.0
# HELP ray_vllm_num_requests_waiting Number of requests waiting to be processed.
# TYPE ray_vllm_num_requests_waiting gauge
ray_vllm_num_requests_waiting{ReplicaId="r1",engine="0",model_name="m"} 1.0
ray_vllm_num_requests_waiting{ReplicaId="r1",engine="1",model_name="m"} 0.0
# HELP ray_vllm_kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE ray_vllm_kv_cache_usage_perc gauge
ray_vllm_kv_cache_usage_perc{ReplicaId="r1",engine="0",model_name="m"} 0.25
ray_vllm_kv_cache_usage_perc{ReplicaId="r1",engine="1",model_name="m"} 0.75
# HELP ray_serve_replica_processing_queries The current number of queries being processed.
# TYPE ray_serve_replica_processing_queries gauge
ray_serve_replica_processing_queries{application="a",deployment="d",replica="r1"} 6.0
"""


def test_status_scrape_adds_counts_and_keeps_the_fullest_kv_cache():
    from cluster.serving.status import scrape_replica_load

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = SCRAPE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # The second endpoint answers nothing: it leaves "-", not an error.
        loads = scrape_replica_load([f"http://127.0.0.1:{server.server_port}/metrics", "http://127.0.0.1:9/metrics"])
    finally:
        server.shutdown()
    load = loads["r1"]
    assert (load.running, load.waiting, load.kv_cache, load.ongoing) == (5.0, 1.0, 0.75, 6.0)
