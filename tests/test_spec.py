"""Deployment spec: validation, clear errors (file, key, fix), env expansion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.errors import ConfigError
from cluster.serving.app import engine_kwargs_for, llm_config_for
from cluster.serving.config_file import load_serve_config
from cluster.serving.spec import expand_env, load_serving_args, parse_mm_limits

ROOT = Path(__file__).resolve().parents[1]


def replica_bundles(spec) -> list[dict]:
    """The placement-group bundles Ray Serve LLM derives for one replica of ``spec`` (no Ray instance needed)."""
    from ray.serve.llm import LLMConfig

    return LLMConfig(**llm_config_for(spec)).get_engine_config().placement_bundles


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
    bundles = replica_bundles(spec)
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


def _validate(path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", "validate", str(path), *extra],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})


def test_validate_checks_tp_pp_against_a_hostfile(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("10.0.0.1 slots=8 type=GPU\n10.0.0.2 slots=8 type=GPU\n")
    path = _serve_file(tmp_path, {"model": "/m", "tensor_parallel_size": 8, "pipeline_parallel_size": 2})
    assert _validate(path, "--hostfile", str(hf)).returncode == 0
    r = _validate(path, "--hostfile", str(hf), "--set", "tensor_parallel_size=16")
    assert r.returncode == 1 and "tensor_parallel_size" in r.stderr and "largest: 8" in r.stderr, r.stderr
    r = _validate(path, "--hostfile", str(hf), "--set", "pipeline_parallel_size=3")
    assert r.returncode == 1 and "applications.0.args.pipeline_parallel_size" in r.stderr, r.stderr


def test_validate_checks_tp_against_the_model_heads(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(
        {"text_config": {"num_attention_heads": 40, "num_key_value_heads": 8, "num_hidden_layers": 64}}))
    path = _serve_file(tmp_path, {"model": str(model), "tensor_parallel_size": 8})
    assert _validate(path).returncode == 0
    r = _validate(path, "--set", "tensor_parallel_size=3")
    assert r.returncode == 1 and "does not divide the model's 40 attention heads" in r.stderr, r.stderr
    r = _validate(path, "--set", "tensor_parallel_size=5")  # divides the 40 heads, not the 8 KV heads
    assert r.returncode == 1 and "8 KV heads" in r.stderr, r.stderr
    r = _validate(tmp_path / "model" / "config.json")
    assert r.returncode == 1 and "applications" in r.stderr and "Traceback" not in r.stderr


def test_replicas_and_autoscaling():
    spec = _one({"model": "/m", "replicas": 2})
    assert spec.replicas.deployment_config(spec.engine_batch)["num_replicas"] == 2
    spec = _one({"model": "/m", "replicas": {"autoscaling": {"min_replicas": 1, "max_replicas": 4,
                                                              "target_ongoing_requests": 8}}})
    auto = spec.replicas.deployment_config(spec.engine_batch)["autoscaling_config"]
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


def test_max_ongoing_requests_defaults_to_what_the_engine_batches():
    # Serve admitting fewer than the engine batches throttled c=128 to 78% of plain vLLM.
    spec = _one({"model": "/m", "engine_args": {"max_num_seqs": 48}})
    assert spec.replicas.deployment_config(spec.engine_batch)["max_ongoing_requests"] == 48
    gpu = _one({"model": "/m", "tensor_parallel_size": 2})
    assert gpu.replicas.deployment_config(gpu.engine_batch)["max_ongoing_requests"] == 1024
    cpu = _one({"model": "/m", "accelerator": "CPU"})
    assert cpu.replicas.deployment_config(cpu.engine_batch)["max_ongoing_requests"] == 128
    fixed = _one({"model": "/m", "replicas": {"num_replicas": 1, "max_ongoing_requests": 7}})
    cfg = fixed.replicas.deployment_config(fixed.engine_batch)
    assert cfg["max_ongoing_requests"] == 7 and cfg["max_constructor_retry_count"] == 2


def test_in_cluster_expansion_refuses_defaults_the_shell_may_have_overridden():
    args = {"model": {"source": "${MODEL_DIR:-/nfs/m}"}}
    with pytest.raises(ConfigError) as err:
        load_serving_args(args, "Serve application args", in_cluster=True)
    text = str(err.value)
    assert "MODEL_DIR" in text and "fleetserve serve" in text and "env.MODEL_DIR" in text
    # Set in the cluster's own environment (hostfile env.*): used.
    os.environ["MODEL_DIR"] = "/from/cluster"
    try:
        assert load_serving_args(args, in_cluster=True).models[0].model.source == "/from/cluster"
    finally:
        del os.environ["MODEL_DIR"]
    # A driver the user started (serve.run in Python, `fleetserve serve`) sees the user's env: defaults apply.
    assert load_serving_args(args).models[0].model.source == "/nfs/m"


def _serve_file(tmp_path, args, name="app"):
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump({"applications": [
        {"name": name, "import_path": "cluster.serving.app:build_app", "args": args}]}))
    return path


def test_overrides_resolve_in_this_shell(tmp_path):
    path = _serve_file(tmp_path, {"model": {"source": "${MODEL_DIR:-/nfs/m}", "load_format": "${LF:-auto}"},
                                  "tensor_parallel_size": 8, "accelerator_type": "H100",
                                  "flaggems": {"enabled": "${GEMS:-false}"}})
    cfg = load_serve_config(path, ["tensor_parallel_size=2", "accelerator_type=null", "app/replicas=3"],
                            environ={"MODEL_DIR": "/here", "LF": "dummy", "GEMS": "true"})
    spec = cfg["_fleetserve"]["app"].models[0]
    assert (spec.model.source, spec.model.load_format, spec.tensor_parallel_size) == ("/here", "dummy", 2)
    assert spec.accelerator_type is None and spec.flaggems.enabled and spec.replicas.num_replicas == 3
    args = cfg["applications"][0]["args"]
    assert "${" not in yaml.safe_dump(args)  # what is handed to Serve holds no reference left
    for bad, where in (("nokey", "KEY=VALUE"), ("other/tensor_parallel_size=2", "no fleetserve application"),
                       ("tensor_parallel_size.x=1", "not a mapping"), ("tensor_parallel_size=zwei", "integer")):
        with pytest.raises(ConfigError) as err:
            load_serve_config(path, [bad], environ={})
        assert where in str(err.value), (bad, str(err.value))


def test_unreadable_files_are_clear_errors(tmp_path):
    binary = tmp_path / "b.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not a text file"):
        load_serve_config(binary)
    nul = tmp_path / "n.yaml"
    nul.write_text("applications: []\x00")
    with pytest.raises(ConfigError, match="NUL"):
        load_serve_config(nul)


@pytest.mark.parametrize("local", [True, False])
def test_a_local_model_skips_ray_serve_llms_per_node_download_tasks(tmp_path, local):
    """A local directory has nothing to download: no per-node tasks (each a cold Ray worker)."""
    import asyncio

    from ray.serve.llm import LLMConfig

    from cluster.serving.engine import LocalModelNodeInit

    source = str(tmp_path) if local else "org/some-hub-id"
    callback = LLMConfig(**llm_config_for(_one({"model": source}))).get_or_create_callback()
    assert isinstance(callback, LocalModelNodeInit)
    asyncio.run(callback.run_callback("on_before_node_init"))
    assert callback.ctx.run_init_node is (not local)
