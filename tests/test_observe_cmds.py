"""``fleetserve prometheus`` without a cluster: the config it writes and its errors.

The live path (Prometheus scraping a running app through Ray's service-discovery
file) is tested in tests/test_metrics.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess

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
