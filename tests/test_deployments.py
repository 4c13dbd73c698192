"""The shipped multi-model deployments validate and build (CPU only, no cluster, no weights).

``fleetserve validate FILE --build`` checks every spec and builds the Serve
application graph exactly as ``serve run`` would, so a broken deployment file
fails CI rather than a GPU cluster.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.cli import app as cli
from cluster.serving.app import llm_config_for
from cluster.serving.config_file import load_serve_config
from test_spec import replica_bundles

ROOT = Path(__file__).resolve().parents[1]
ENV_KNOBS = ("QWEN25_VL_32B_PATH", "MINICPM_O_26_PATH", "FLEETSERVE_LOAD_FORMAT", "FLEETSERVE_USE_FLAGGEMS",
             "QWEN25_VL_MAX_REPLICAS", "MINICPM_O_MAX_REPLICAS")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ENV_KNOBS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("name", ["minicpm_o_26.yaml", "fleet.yaml"])
def test_validate_build(name):
    result = CliRunner().invoke(cli, ["validate", str(ROOT / "deployments" / name), "--build"])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output
    # The dry run built one vLLM deployment per model plus the ingress.
    built = set(re.findall(r"deployment (\S+): replicas", result.output))
    assert "FleetIngress" in built
    assert any(d.startswith("FleetLLMServer:MiniCPM-o") for d in built), result.output


def test_minicpm_o_matches_seed_card():
    spec = load_serve_config(ROOT / "deployments/minicpm_o_26.yaml")["_fleetserve"]["minicpm-o"].models[0]
    assert spec.model.source == "/nfs/MiniCPM_o_2.6"
    assert spec.engine_args["trust_remote_code"] is True
    assert spec.limit_mm_per_prompt["image"] >= 1
    assert (spec.tensor_parallel_size, spec.pipeline_parallel_size, spec.accelerator) == (1, 1, "GPU")
    auto = spec.replicas.autoscaling
    assert auto is not None and auto.min_replicas == 1 and auto.max_replicas >= 2
    cfg = llm_config_for(spec)
    assert cfg["engine_kwargs"]["trust_remote_code"] is True
    assert cfg["deployment_config"]["autoscaling_config"]["max_replicas"] == auto.max_replicas


def test_minicpm_o_env_switches(monkeypatch):
    monkeypatch.setenv("MINICPM_O_26_PATH", "/models/minicpm")
    monkeypatch.setenv("FLEETSERVE_LOAD_FORMAT", "dummy")
    monkeypatch.setenv("MINICPM_O_MAX_REPLICAS", "6")
    spec = load_serve_config(ROOT / "deployments/minicpm_o_26.yaml")["_fleetserve"]["minicpm-o"].models[0]
    assert spec.model.source == "/models/minicpm"
    assert llm_config_for(spec)["engine_kwargs"]["load_format"] == "dummy"
    assert spec.replicas.autoscaling.max_replicas == 6


def test_fleet_serves_both_models_side_by_side():
    cfg = load_serve_config(ROOT / "deployments/fleet.yaml")
    assert list(cfg["_fleetserve"]) == ["fleet"]
    serving = cfg["_fleetserve"]["fleet"]
    names = [m.served_name for m in serving.models]
    assert names == ["Qwen2.5-VL-32B-Instruct", "MiniCPM-o-2.6"]
    qwen, minicpm = serving.models
    # Each model scales on its own: separate autoscaling configs, separate placement.
    assert qwen.replicas.autoscaling and minicpm.replicas.autoscaling
    assert len(replica_bundles(qwen)) == 8 and len(replica_bundles(minicpm)) == 1
    assert qwen.limit_mm_per_prompt == {"image": 18}


def test_fleet_models_match_their_single_deployments():
    """fleet.yaml's blocks are the single-model files' args (so either layout serves the same)."""
    fleet = load_serve_config(ROOT / "deployments/fleet.yaml")["_fleetserve"]["fleet"].models
    qwen = load_serve_config(ROOT / "deployments/qwen25_vl.yaml")["_fleetserve"]["qwen25-vl"].models[0]
    minicpm = load_serve_config(ROOT / "deployments/minicpm_o_26.yaml")["_fleetserve"]["minicpm-o"].models[0]
    for mine, single in ((fleet[0], qwen), (fleet[1], minicpm)):
        a, b = llm_config_for(mine), llm_config_for(single)
        assert a["model_loading_config"] == b["model_loading_config"]
        assert a["placement_group_config"] == b["placement_group_config"]
        assert a["engine_kwargs"] == b["engine_kwargs"]


def test_grafana_dashboard_queries_known_series():
    """Every series the dashboard queries is one fleetserve documents (the slow test scrapes them)."""
    from cluster.serving.metrics import EXPORTED

    dash = json.loads((ROOT / "deployments/grafana/fleetserve.json").read_text())
    used = dashboard_metric_names(dash)
    assert used, "the dashboard queries no series"
    serve_series = {n for n in used if n.startswith("ray_serve_")}
    assert used - serve_series <= set(EXPORTED.values()), used - set(EXPORTED.values())
    for key in ("running", "waiting", "kv_cache", "ttft", "tpot", "generation_tokens", "flaggems_ops"):
        assert EXPORTED[key] in used, key


_NAME = re.compile(r"\b(ray_[a-zA-Z0-9_]+)")


def dashboard_metric_names(dash: dict) -> set[str]:
    """Metric names in every panel's PromQL (``_bucket``/``_sum``/``_count`` folded to the family)."""
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if t.get("expr")]
    exprs += [v["definition"] for v in dash.get("templating", {}).get("list", []) if v.get("definition")]
    names = set()
    for expr in exprs:
        for name in _NAME.findall(expr):
            names.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return names


def test_engine_metrics_switch_reaches_ray_serve_llm():
    """On by default (the Grafana dashboard reads them); ``--set engine_metrics=false`` turns Ray's exporter off."""
    path = ROOT / "deployments/qwen25_vl.yaml"
    (default,) = load_serve_config(path)["_fleetserve"].values()
    (off,) = load_serve_config(path, ["engine_metrics=false"])["_fleetserve"].values()
    assert llm_config_for(default.models[0])["log_engine_metrics"] is True
    assert llm_config_for(off.models[0])["log_engine_metrics"] is False


def test_engine_metrics_without_engine_stats_is_a_spec_error():
    from cluster.errors import ConfigErrors

    path = ROOT / "deployments/qwen25_vl.yaml"
    with pytest.raises(ConfigErrors) as err:
        load_serve_config(path, ["engine_args.disable_log_stats=true"])
    assert "disable_log_stats" in str(err.value) and "engine_metrics" in str(err.value)
    (ok,) = load_serve_config(path, ["engine_args.disable_log_stats=true", "engine_metrics=false"])["_fleetserve"].values()
    assert llm_config_for(ok.models[0])["log_engine_metrics"] is False
