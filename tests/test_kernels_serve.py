"""The replica's FlagGems plan reaches every vLLM process of its deployment, and no other.

Real Ray Serve + ray.serve.llm + vLLM (CPU) with the app builder: one app whose
spec has ``flaggems: {enabled: true, fallback_to_stock: true}`` and TP=2, one
plain app with TP=1. On a CPU host the replica plans ``fallback`` (the
diagnostic mode that works here); the plugin still writes its per-process
report with the plan it followed, so the reports show which processes the plan
reached: the replica, its engine core and both TP workers -- the plan is made
in the replica at start, after Ray started it, so only the environment vLLM
hands its processes can have brought it there -- and none of the plain
deployment's. (On CPU, ray.serve.llm runs vLLM's multiprocessing executor, so
the workers inherit the env; on GPU vLLM's Ray executor copies it -- the
unit test ``test_vllm_ray_executors_copy_the_plan`` pins that part.)
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tinyqwen2 import CPU_ENGINE_ENV, local_ray
from waiting import wait_for

pytestmark = pytest.mark.slow

PORT = 8130
BASE = f"http://127.0.0.1:{PORT}"


def _spec(model: Path, name: str, tp: int, flaggems: dict | None) -> dict:
    spec = {
        "model": {"source": str(model), "served_name": name},
        "accelerator": "CPU", "cpus_per_worker": 0.5, "replica_cpus": 0.5,
        "tensor_parallel_size": tp, "limit_mm_per_prompt": {"image": 0},
        "engine_args": {"max_model_len": 512, "max_num_seqs": 4, "max_num_batched_tokens": 512,
                        "dtype": "bfloat16", "enforce_eager": True},
        # vLLM's CPU workers bind OpenMP threads per rank; with one NUMA node the
        # binding for TP>1 must be given (one core per rank here).
        "runtime_env": {"env_vars": {**CPU_ENGINE_ENV,
                                     "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i) for i in range(tp))}},
    }
    if flaggems:
        spec["flaggems"] = flaggems
    return spec


@pytest.fixture(scope="module")
def serve_instance(tmp_path_factory):
    report_dir = tmp_path_factory.mktemp("flaggems-reports")
    from ray import serve

    with pytest.MonkeyPatch.context() as env:
        env.setenv("FLEETSERVE_FLAGGEMS_REPORT_DIR", str(report_dir))  # inherited by Ray's workers
        with local_ray(runtime_env={"env_vars": {"FLEETSERVE_FLAGGEMS_REPORT_DIR": str(report_dir)}}):
            serve.start(http_options={"host": "127.0.0.1", "port": PORT})
            try:
                yield report_dir
            finally:
                serve.shutdown()


def _deploy(name: str, spec: dict) -> None:
    from ray import serve

    from cluster.serving.app import build_app

    serve.run(build_app(spec), name=name, route_prefix=f"/{name}", blocking=False)
    _wait([name], timeout=900)


def _wait(names: list[str], timeout: float) -> None:
    from ray import serve

    def all_running() -> bool:
        status = serve.status().applications
        states = {n: status[n].status for n in names if n in status}
        if any(s in ("DEPLOY_FAILED", "UNHEALTHY") for s in states.values()):
            raise AssertionError(f"deploy failed: {status}")
        return len(states) == len(names) and all(s == "RUNNING" for s in states.values())

    wait_for(all_running, timeout, f"apps {names} running", poll=3, state=lambda: serve.status().applications)


def _vllm_tree(replica_marker: str) -> tuple[int, set[int]]:
    """The replica process whose title has ``replica_marker`` and its vLLM child processes."""
    import psutil

    (replica,) = [p for p in psutil.process_iter(["cmdline"])
                  if replica_marker in " ".join(p.info["cmdline"] or [])]
    vllm = {c.pid for c in replica.children(recursive=True)
            if any(m in " ".join(c.cmdline()) for m in ("VLLM::", "spawn_main"))}
    return replica.pid, vllm


def _complete(model: str) -> None:
    r = httpx.post(f"{BASE}/{model}/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 4},
                   timeout=300)
    assert r.status_code == 200, r.text


def test_armed_in_every_process_of_that_deployment_only(tiny_model, serve_instance):
    """Deployed one after the other (two CPU engines at once overrun a 24 GiB host)."""
    from ray import serve

    from cluster.kernels import collect_reports

    report_dir = serve_instance
    _deploy("gems", _spec(tiny_model, "gems", 2, {"enabled": True, "fallback_to_stock": True,
                                                 "graph_mode": "eager"}))
    _complete("gems")
    replica, children = _vllm_tree("ServeReplica:gems:FleetLLMServer")
    gems = collect_reports("gems")
    pids = {p["pid"] for p in gems["processes"]}
    # replica (API/engine client), engine core, one worker per TP rank -- each armed
    assert len(children) >= 3, children
    assert {replica} | children == pids, (replica, children, pids)
    assert gems["summary"] == {"processes": len(pids), "triton_ops": [], "failed": [], "status": "fallback"}
    # one decision, the same in every process: replica, engine core, each TP worker
    (plan,) = {json.dumps(rep["plan"], sort_keys=True) for rep in gems["processes"]}
    assert json.loads(plan)["mode"] == "fallback" and "no CUDA GPU" in json.loads(plan)["reason"]
    titles = [rep["process"] for rep in gems["processes"]]
    assert len(titles) == 1 + 1 + 2, titles  # replica, engine core, TP=2 workers
    assert sum("EngineCore" in t for t in titles) == 1, titles
    for rep in gems["processes"]:
        assert rep["deployment"] == "gems" and rep["status"] == "fallback"
        assert set(rep["ops"]) == {"rms_norm", "fused_add_rms_norm", "silu_and_mul"}
    serve.delete("gems")

    _deploy("plain", _spec(tiny_model, "plain", 1, None))
    _complete("plain")
    replica, children = _vllm_tree("ServeReplica:plain:FleetLLMServer")
    assert children, "the plain deployment runs vLLM processes too"
    assert collect_reports("plain")["summary"]["processes"] == 0
    assert {p.parent.name for p in report_dir.glob("*/*.json")} == {"gems"}
    armed = {int(p.stem.rsplit("-", 1)[1]) for p in report_dir.glob("*/*.json")}
    assert not armed & ({replica} | children)
    serve.delete("plain")
