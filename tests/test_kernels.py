"""The FlagGems switch on a CPU host: config, the op table, the replica's plan,
the plugin following it, reports, clear failure.

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
    OP_SETS,
    OPS,
    PLAN_ENV_VAR,
    FlagGemsConfig,
    FlagGemsUnavailable,
    KernelPlan,
    collect_reports,
    config_from_env,
    ops_of_kind,
    parse_flaggems,
    plan_from_env,
    plan_kernels,
    runtime_env_vars,
)
from cluster.kernels.report import REPORT_DIR_ENV_VAR

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- config

def test_defaults_off_and_default_op_set():
    cfg = FlagGemsConfig()
    assert not cfg.enabled and cfg.graph_mode == "compiled" and not cfg.fallback_to_stock
    assert cfg.selected_ops() == ("rms_norm", "fused_add_rms_norm", "silu_and_mul")
    assert runtime_env_vars(cfg) == {}
    plan = plan_kernels(cfg, "d")
    assert plan.mode == "off" and plan.engine_kwargs() == {} and plan.env({}) == {}


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


def _active(**cfg) -> KernelPlan:
    """The plan a GPU host with FlagGems would give (this host has no GPU to probe)."""
    c = parse_flaggems({"enabled": True, **cfg})
    return KernelPlan(deployment="d", mode="active", ops=c.selected_ops(), graph_mode=c.graph_mode)


def test_op_table_is_the_one_list():
    from cluster.kernels.ops import INSTALLERS

    assert set(INSTALLERS) == set(OPS), "one installer per op of the table"
    assert ops_of_kind("ir") == ("rms_norm", "fused_add_rms_norm")
    assert ops_of_kind("custom") == ("silu_and_mul", "rotary_embedding")
    assert all(op in OPS for ops in OP_SETS.values() for op in ops)
    assert OP_SETS["all"] == tuple(OPS)
    # docs/flaggems.md's op table names each op with its kind
    docs = (ROOT / "docs" / "flaggems.md").read_text()
    for op, spec in OPS.items():
        assert f"| `{op}` | {spec.kind} |" in docs, op


def test_engine_kwargs_per_graph_mode():
    kw = _active(graph_mode="compiled").engine_kwargs()
    assert kw["ir_op_priority"] == {"rms_norm": ["flaggems"], "fused_add_rms_norm": ["flaggems"]}
    assert kw["compilation_config"] == {"custom_ops": ["+silu_and_mul"]}
    kw = _active(graph_mode="full_decode").engine_kwargs()
    assert kw["compilation_config"] == {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    kw = _active(graph_mode="eager").engine_kwargs()
    assert kw["enforce_eager"] is True and "compilation_config" not in kw
    kw = _active(graph_mode="piecewise", include=["silu_and_mul"]).engine_kwargs()
    assert kw == {"compilation_config": {"cudagraph_mode": "PIECEWISE", "custom_ops": ["+silu_and_mul"]}}
    assert "compilation_config" not in _active(ops="norms").engine_kwargs()  # compiled, no CustomOp: vLLM's own


def test_fallback_keeps_the_graph_mode_only():
    for mode, expected in (("compiled", {}), ("eager", {"enforce_eager": True}),
                           ("piecewise", {"compilation_config": {"cudagraph_mode": "PIECEWISE"}})):
        plan = plan_kernels(parse_flaggems({"enabled": True, "fallback_to_stock": True, "graph_mode": mode,
                                            "ops": "all"}), "d")
        assert plan.mode == "fallback" and plan.engine_kwargs() == expected, mode


def test_engine_kwargs_are_valid_vllm_engine_args():
    from vllm.engine.arg_utils import AsyncEngineArgs

    for mode in ("compiled", "full_decode", "piecewise", "eager"):
        kw = _active(ops="all", graph_mode=mode).engine_kwargs()
        AsyncEngineArgs(model="unused", **kw)  # raises on unknown/ill-typed fields


def test_plan_on_this_cpu_host_fails_clearly_or_falls_back():
    with pytest.raises(FlagGemsUnavailable, match="no CUDA GPU is visible.*fallback_to_stock: true"):
        plan_kernels(parse_flaggems({"enabled": True}), "d")
    plan = plan_kernels(parse_flaggems({"enabled": True, "fallback_to_stock": True}), "d")
    assert plan.mode == "fallback" and "no CUDA GPU" in plan.reason
    assert plan.ops == FlagGemsConfig().selected_ops()


def test_plan_env_round_trip_and_vllm_copy_list():
    plan = _active(record=True)
    env = plan.env({"VLLM_RAY_EXTRA_ENV_VARS_TO_COPY": "MY_VAR"})
    assert env["VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"] == f"MY_VAR,{PLAN_ENV_VAR}"
    assert plan.env(env)["VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"] == env["VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"]
    assert plan_from_env(env) == plan and plan_from_env({}) is None
    with pytest.raises(Exception, match="not a valid FlagGems plan"):
        plan_from_env({PLAN_ENV_VAR: '{"mode": "sometimes"}'})


def test_vllm_ray_executors_copy_the_plan(monkeypatch):
    """The plan set in the replica's env reaches the Ray workers: both of vLLM's
    Ray executors build the workers' env with these functions (vLLM 0.26)."""
    from vllm.ray.ray_env import get_env_vars_to_copy
    from vllm.v1.executor.ray_env_utils import get_driver_env_vars

    monkeypatch.delenv("VLLM_RAY_EXTRA_ENV_VARS_TO_COPY", raising=False)
    for name, value in _active().env(os.environ).items():
        monkeypatch.setenv(name, value)
    assert PLAN_ENV_VAR in get_env_vars_to_copy(exclude_vars=set())  # V1 executor
    assert PLAN_ENV_VAR in get_driver_env_vars(worker_specific_vars=set())  # V2 executor (default)


def test_requested_config_env_round_trip_and_bad_env():
    cfg = parse_flaggems({"enabled": True, "record": True, "exclude": ["silu_and_mul"]})
    env = runtime_env_vars(cfg)
    assert list(env) == [ENV_VAR]  # the request only: the replica makes the plan
    assert config_from_env(env) == cfg
    assert config_from_env({}) is None
    with pytest.raises(Exception, match="not a valid flaggems config"):
        config_from_env({ENV_VAR: "{not json"})


def test_plugin_entry_point_is_registered():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("fleetserve_flaggems") == "cluster.kernels.plugin:register"


# ---------------------------------------------------------------- plugin, in vLLM's way

_LOAD = """
import json
from vllm.plugins import load_general_plugins
from vllm import ir
load_general_plugins()
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


def test_plugin_is_a_no_op_without_a_plan(tmp_path):
    # the requested config alone (it reaches the workers through the runtime env) arms nothing
    proc = _run_plugin(runtime_env_vars(parse_flaggems({"enabled": True})), tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "flaggems" not in out["providers"] and not out["silu_patched"]
    assert not any(tmp_path.iterdir()), "no report without a plan"


def test_plugin_follows_a_fallback_plan(tmp_path):
    plan = plan_kernels(parse_flaggems({"enabled": True, "fallback_to_stock": True}), "fb")
    proc = _run_plugin(plan.env({}), tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "flaggems" not in out["providers"] and not out["silu_patched"]  # nothing installed
    (report,) = [json.loads(p.read_text()) for p in (tmp_path / "fb").glob("*.json")]
    assert report["status"] == "fallback" and report["reason"] == plan.reason
    assert report["plan"] == plan.model_dump(mode="json")
    assert {r["status"] for r in report["ops"].values()} == {"skipped"}


def test_plugin_follows_an_active_plan_without_checking_the_host(tmp_path):
    """The replica decided; on this CPU host the ops still install (only their kernels need a GPU)."""
    plan = _active(ops="all", graph_mode="eager").model_copy(update={"deployment": "on"})
    proc = _run_plugin(plan.env({}), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "flaggems" in out["providers"] and out["silu_patched"]
    (report,) = [json.loads(p.read_text()) for p in (tmp_path / "on").glob("*.json")]
    assert report["status"] == "active" and report["kernels_loaded"] is None  # no kernel called yet
    assert {op: r["status"] for op, r in report["ops"].items()} == {op: "patched" for op in OPS}
    assert report["tuning_cache_dir"] == os.path.expanduser(plan.tuning_cache_dir)


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
