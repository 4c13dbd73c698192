"""Deployment spec: validation, clear errors (file, key, fix), env expansion."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.errors import ConfigError
from cluster.serving.app import engine_kwargs_for, llm_config_for
from cluster.spec import expand_env, load_serve_config, load_serving_args, parse_mm_limits

ROOT = Path(__file__).resolve().parents[1]


def _one(args: dict):
    return load_serving_args(args, source="test.yaml").models[0]


def _error_text(args: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        load_serving_args(args, source="test.yaml")
    return str(exc.value)


def test_shipped_deployments_validate(monkeypatch):
    monkeypatch.delenv("QWEN25_VL_32B_PATH", raising=False)
    for path in sorted((ROOT / "deployments").glob("*.yaml")):
        cfg = load_serve_config(path)
        assert cfg["_fleetserve"], path


def test_qwen25_vl_matches_seed_card(monkeypatch):
    monkeypatch.delenv("QWEN25_VL_32B_PATH", raising=False)
    monkeypatch.delenv("FLEETSERVE_LOAD_FORMAT", raising=False)
    spec = load_serve_config(ROOT / "deployments/qwen25_vl.yaml")["_fleetserve"]["qwen25-vl"].models[0]
    assert spec.model.source == "/nfs/Qwen2.5-VL-32B-Instruct"
    assert (spec.tensor_parallel_size, spec.pipeline_parallel_size) == (8, 1)
    assert spec.limit_mm_per_prompt == {"image": 18}
    kwargs = engine_kwargs_for(spec)
    assert kwargs["gpu_memory_utilization"] == 0.9
    assert kwargs["enable_chunked_prefill"] is True
    assert "load_format" not in kwargs
    bundles = llm_config_for(spec)["placement_group_config"]["bundles"]
    assert len(bundles) == 8 and all(b["GPU"] == 1 for b in bundles)


def test_env_switches_model_path_and_dummy_weights(monkeypatch):
    monkeypatch.setenv("QWEN25_VL_32B_PATH", "/models/q32")
    monkeypatch.setenv("FLEETSERVE_LOAD_FORMAT", "dummy")
    spec = load_serve_config(ROOT / "deployments/qwen25_vl.yaml")["_fleetserve"]["qwen25-vl"].models[0]
    assert spec.model.source == "/models/q32"
    assert engine_kwargs_for(spec)["load_format"] == "dummy"


def test_env_expansion_keeps_types():
    env = {"N": "3", "FLAG": "true"}
    assert expand_env({"a": "${N}", "b": "${FLAG}", "c": "x-${N}", "d": "${MISSING:-7}"}, env) == {
        "a": 3, "b": True, "c": "x-3", "d": 7,
    }


def test_missing_env_var_names_it():
    text = _error_text({"model": "${NO_SUCH_VAR_FOR_TEST}"})
    assert "NO_SUCH_VAR_FOR_TEST" in text and "test.yaml" in text and "fix:" in text


def test_unknown_engine_arg_suggests_the_right_name():
    text = _error_text({"model": "/m", "engine_args": {"gpu_memory_utilisation": 0.9}})
    assert "test.yaml: args.engine_args" in text
    assert "gpu_memory_utilisation" in text and "gpu_memory_utilization" in text


def test_spec_owned_engine_arg_points_to_top_level_key():
    text = _error_text({"model": "/m", "engine_args": {"tensor_parallel_size": 2}})
    assert "use `tensor_parallel_size`" in text


@pytest.mark.parametrize("bad", ["image=lots", "image", {"image": -1}, {"picture": 2}, ["image"], "=3"])
def test_malformed_mm_limits(bad):
    text = _error_text({"model": "/m", "limit_mm_per_prompt": bad})
    assert "args.limit_mm_per_prompt" in text


def test_mm_limits_seed_syntax():
    assert parse_mm_limits("image=18") == {"image": 18}
    assert parse_mm_limits("image=2, video=1") == {"image": 2, "video": 1}
    assert _one({"model": "/m", "limit_mm_per_prompt": "image=18"}).limit_mm_per_prompt == {"image": 18}


def test_unknown_key_is_rejected_with_fix():
    text = _error_text({"model": "/m", "tensor_paralel_size": 2})
    assert "args.tensor_paralel_size" in text and "spelling" in text


def test_tp_larger_than_any_host(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("10.0.0.1 slots=8 type=H100\n10.0.0.2 slots=8 type=H100\n")
    text = _error_text({"model": "/m", "tensor_parallel_size": 16, "hostfile": str(hf)})
    assert "args.tensor_parallel_size" in text and "largest: 8" in text and "pipeline_parallel_size" in text


def test_pp_stages_must_fit_hosts(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("10.0.0.1 slots=8\n10.0.0.2 slots=8\n")
    assert _one({"model": "/m", "tensor_parallel_size": 8, "pipeline_parallel_size": 2, "hostfile": str(hf)})
    text = _error_text({"model": "/m", "tensor_parallel_size": 8, "pipeline_parallel_size": 3, "hostfile": str(hf)})
    assert "args.pipeline_parallel_size" in text


def test_replicas_and_autoscaling():
    spec = _one({"model": "/m", "replicas": 2})
    assert spec.replicas.deployment_config()["num_replicas"] == 2
    spec = _one({"model": "/m", "replicas": {"autoscaling": {"min_replicas": 1, "max_replicas": 4,
                                                              "target_ongoing_requests": 8}}})
    auto = spec.replicas.deployment_config()["autoscaling_config"]
    assert auto["max_replicas"] == 4 and auto["target_ongoing_requests"] == 8
    text = _error_text({"model": "/m", "replicas": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})
    assert "max_replicas" in text


def test_multi_model_args_need_distinct_names():
    serving = load_serving_args({"models": [{"model": "/a/x"}, {"model": "/b/y"}]}, source="t.yaml")
    assert [m.served_name for m in serving.models] == ["x", "y"]
    with pytest.raises(ConfigError) as exc:
        load_serving_args({"models": [{"model": "/a/x"}, {"model": "/b/x"}]}, source="t.yaml")
    assert "served_name" in str(exc.value)


def test_flaggems_on_cpu_accelerator_is_refused():
    text = _error_text({"model": "/m", "accelerator": "CPU", "flaggems": {"enabled": True}})
    assert "args.flaggems.enabled" in text


def test_serve_config_errors_name_application_key(tmp_path):
    cfg = {"applications": [{"name": "a", "import_path": "cluster.serving.app:build_app",
                             "args": {"model": "/m", "replicas": 0}}]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as exc:
        load_serve_config(path)
    assert f"{path}: applications.0.args.replicas" in str(exc.value)


def test_bad_yaml_reports_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("applications:\n  - name: a\n   import_path: x\n")
    with pytest.raises(ConfigError) as exc:
        load_serve_config(path)
    assert "line" in str(exc.value)
