"""The FlagGems switch on a CPU host: config, plugin arming, reports, clear failure.

The plugin runs in subprocesses here, the way vLLM loads it (through the
``vllm.general_plugins`` entry point), so one test's patching never leaks into
another's process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from cluster.errors import ConfigErrors
from cluster.kernels import (
    ENV_VAR,
    FlagGemsConfig,
    FlagGemsUnavailable,
    check_host_support,
    collect_reports,
    config_from_env,
    engine_overrides,
    parse_flaggems,
    runtime_env_vars,
)
from cluster.kernels.report import REPORT_DIR_ENV_VAR

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- config

def test_defaults_off_and_default_op_set():
    cfg = FlagGemsConfig()
    assert not cfg.enabled and cfg.graph_mode == "compiled" and not cfg.fallback_to_stock
    assert cfg.selected_ops() == ("rms_norm", "fused_add_rms_norm", "silu_and_mul")
    assert runtime_env_vars(cfg, "d") == {} and engine_overrides(cfg) == {}


def test_include_and_exclude():
    cfg = parse_flaggems({"enabled": True, "include": ["silu_and_mul", "rotary_embedding"]})
    assert cfg.selected_ops() == ("silu_and_mul", "rotary_embedding")
    cfg = parse_flaggems({"enabled": True, "ops": "all", "exclude": ["rms_norm"]})
    assert cfg.selected_ops() == ("fused_add_rms_norm", "silu_and_mul", "rotary_embedding")
    assert parse_flaggems({"ops": "norms"}).selected_ops() == ("rms_norm", "fused_add_rms_norm")


@pytest.mark.parametrize("data, key, text", [
    ({"enabled": True, "bogus": 1}, "flaggems.bogus", "Extra inputs"),
    ({"ops": "fast"}, "flaggems.ops", "Input should be"),
    ({"graph_mode": "turbo"}, "flaggems.graph_mode", "Input should be"),
    ({"include": ["mm"]}, "flaggems", "unknown op(s) ['mm']"),
    ({"include": []}, "flaggems", "empty list"),
    ({"enabled": True, "include": ["rms_norm"], "exclude": ["rms_norm"]}, "flaggems", "no op left"),
])
def test_invalid_config_names_file_key_and_fix(data, key, text):
    with pytest.raises(ConfigErrors) as err:
        parse_flaggems(data, source="deployments/x.yaml")
    msg = str(err.value)
    assert msg.startswith(f"deployments/x.yaml: {key}"), msg
    assert text in msg, msg
    if "ops" in key or "graph_mode" in key or "bogus" in key:
        assert "fix:" in msg


def test_engine_overrides_per_graph_mode():
    on = {"enabled": True}
    ov = engine_overrides(parse_flaggems({**on, "graph_mode": "compiled"}))
    assert ov["ir_op_priority"] == {"rms_norm": ["flaggems"], "fused_add_rms_norm": ["flaggems"]}
    assert ov["compilation_config"] == {"custom_ops": ["+silu_and_mul"]}
    ov = engine_overrides(parse_flaggems({**on, "graph_mode": "full_decode"}))
    assert ov["compilation_config"] == {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    ov = engine_overrides(parse_flaggems({**on, "graph_mode": "eager"}))
    assert ov["enforce_eager"] is True and "compilation_config" not in ov
    ov = engine_overrides(parse_flaggems({**on, "graph_mode": "piecewise", "include": ["silu_and_mul"]}))
    assert ov == {"compilation_config": {"cudagraph_mode": "PIECEWISE", "custom_ops": ["+silu_and_mul"]}}


def test_engine_overrides_are_valid_vllm_engine_args():
    from vllm.engine.arg_utils import AsyncEngineArgs

    for mode in ("compiled", "full_decode", "piecewise", "eager"):
        ov = engine_overrides(parse_flaggems({"enabled": True, "ops": "all", "graph_mode": mode}))
        AsyncEngineArgs(model="unused", **ov)  # raises on unknown/ill-typed fields


def test_env_round_trip_and_bad_env():
    cfg = parse_flaggems({"enabled": True, "record": True, "exclude": ["silu_and_mul"]})
    env = runtime_env_vars(cfg, "vl7b")
    assert env["FLEETSERVE_FLAGGEMS_DEPLOYMENT"] == "vl7b"
    assert "FLAGGEMS_CACHE_DIR" not in env  # the plugin expands ~ on each host
    assert config_from_env(env) == cfg
    assert config_from_env({}) is None
    with pytest.raises(Exception, match="not a valid flaggems config"):
        config_from_env({ENV_VAR: "{not json"})


def test_plugin_entry_point_is_registered():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("fleetserve_flaggems") == "cluster.kernels.plugin:register"


# ---------------------------------------------------------------- plugin, in vLLM's way

_LOAD = """
import json, os, sys
from vllm.plugins import load_general_plugins
from vllm import ir
try:
    load_general_plugins()
except RuntimeError as exc:
    print("RAISED:" + str(exc)); sys.exit(3)
from vllm.model_executor.layers.activation import SiluAndMul
print(json.dumps({"providers": sorted(ir.ops.rms_norm.impls),
                  "silu_patched": bool(getattr(SiluAndMul.forward_cuda, "__fleetserve_flaggems__", False))}))
"""


def _run_plugin(env_extra: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETSERVE_FLAGGEMS")}
    env.update(env_extra)
    env[REPORT_DIR_ENV_VAR] = str(tmp_path)
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", _LOAD], env=env, capture_output=True, text=True, timeout=300)


def test_plugin_is_a_no_op_without_env_var(tmp_path):
    proc = _run_plugin({}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "flaggems" not in out["providers"] and not out["silu_patched"]
    assert not any(tmp_path.iterdir()), "no report without the env var"


def test_plugin_falls_back_on_cpu_only_when_asked(tmp_path):
    cfg = parse_flaggems({"enabled": True, "fallback_to_stock": True})
    proc = _run_plugin(runtime_env_vars(cfg, "fb"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # the provider exists (so the engine's ir_op_priority stays valid) but nothing is patched
    assert "flaggems" in out["providers"] and not out["silu_patched"]
    (report,) = [json.loads(p.read_text()) for p in (tmp_path / "fb").glob("*.json")]
    assert report["status"] == "fallback" and "not CUDA" in report["reason"]
    assert {r["status"] for r in report["ops"].values()} == {"skipped"}
    assert report["tuning_cache_dir"] == os.path.expanduser(cfg.tuning_cache_dir)


def test_plugin_fails_clearly_on_cpu_without_fallback(tmp_path):
    cfg = parse_flaggems({"enabled": True})
    proc = _run_plugin(runtime_env_vars(cfg, "strict"), tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "RAISED:fleetserve flaggems: deployment 'strict' asked for FlagGems kernels" in proc.stdout
    assert "not CUDA" in proc.stdout and "fallback_to_stock" in proc.stdout
    (report,) = [json.loads(p.read_text()) for p in (tmp_path / "strict").glob("*.json")]
    assert report["status"] == "failed"


def test_host_check_on_cpu():
    assert check_host_support(FlagGemsConfig()).ok  # disabled: nothing to check
    with pytest.raises(FlagGemsUnavailable, match="no CUDA GPU is visible.*fallback_to_stock: true"):
        check_host_support(parse_flaggems({"enabled": True}))
    support = check_host_support(parse_flaggems({"enabled": True, "fallback_to_stock": True}))
    assert not support.ok and "no CUDA GPU" in support.reason


def test_collect_reports_summary_and_stale_processes(tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv(REPORT_DIR_ENV_VAR, str(tmp_path))
    d = tmp_path / "dep"
    d.mkdir()
    host = socket.gethostname()
    live = {"deployment": "dep", "hostname": host, "pid": os.getpid(), "status": "active",
            "ops": {"rms_norm": {"status": "patched"}, "silu_and_mul": {"status": "failed", "reason": "boom"}}}
    dead = {**live, "pid": 2 ** 22 + 12345, "status": "failed"}
    (d / "a.json").write_text(json.dumps(live))
    (d / "b.json").write_text(json.dumps(dead))
    got = collect_reports("dep")
    assert [p["pid"] for p in got["processes"]] == [os.getpid()]
    assert got["summary"] == {"processes": 1, "triton_ops": ["rms_norm"], "failed": ["silu_and_mul: boom"],
                              "status": "active"}
    assert len(collect_reports("dep", include_stale=True)["processes"]) == 2
    assert collect_reports("other")["summary"]["status"] == "none"
