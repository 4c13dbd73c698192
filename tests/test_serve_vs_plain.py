"""The serving-overhead report's CPU-only parts (benchmarks/gpu/serve_vs_plain.py; its runs need GPUs).

Fast, no Ray: run files as the ``run`` phase writes them go through ``report``,
which compares every labelled run with ``plain``, keeps every load some run
measured, and refuses what would silently merge or mislabel runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "serve_vs_plain.py"


def load(name: str, tok_s: float | None, ttft: float = 50.0) -> dict:
    if tok_s is None:
        return {"load": name, "error": "deadline"}
    return {"load": name, "output_throughput": tok_s, "median_ttft_ms": ttft, "median_tpot_ms": 9.0, "failed": 0}


def run_file(tmp: Path, label: str, phase: str, loads: list[dict], commit: str = "a" * 40) -> Path:
    path = tmp / f"{label}.json"
    path.write_text(json.dumps({"phase": phase, "label": label, "commit": commit, "device": "1 x H100",
                                "command": "python3 ...", "ready_s": 100.0, "loads": loads}))
    return path


def report(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "report", *args, "--name", "r", "--results-dir", str(tmp)],
                          capture_output=True, text=True, timeout=120)


def test_every_run_against_plain_and_every_measured_load(tmp_path: Path) -> None:
    plain = run_file(tmp_path, "plain", "plain", [load("random_c1", 100.0), load("random_c128", 8000.0),
                                                   load("random_c256", None)])
    serve = run_file(tmp_path, "serve", "serve", [load("random_c1", 95.0), load("random_c128", 4000.0),
                                                   load("random_c256", 4100.0)])
    direct = run_file(tmp_path, "direct", "direct", [load("random_c128", 6000.0)])
    r = report(tmp_path, str(plain), str(serve), str(direct), "--run-commit", "direct=" + "b" * 40)
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "r.json").read_text())
    rows = {row["load"]: row for row in out["rows"]}
    assert list(rows) == ["random_c1", "random_c128", "random_c256"]  # LOADS order; c256 only serve measured
    assert rows["random_c128"]["variants"]["serve"]["ratio"] == 0.5
    assert rows["random_c128"]["variants"]["direct"]["ratio"] == 0.75
    assert rows["random_c128"]["ratio"] == 0.5  # serve's figures also as the row's own keys
    assert rows["random_c256"]["variants"]["serve"]["tok_s"] == 4100.0 and "ratio" not in rows["random_c256"]
    assert rows["random_c1"]["variants"]["direct"]["tok_s"] is None  # a load a run did not measure
    assert list(out)[1:4] == ["commit", "device", "time"] and out["time"].endswith("Z")
    assert out["runs"]["direct"]["commit"] == "b" * 40
    assert out["runs"]["direct"]["commit_corrected"]["recorded"] == "a" * 40
    assert (tmp_path / "r.png").stat().st_size > 0


@pytest.mark.parametrize("case", ["duplicate label", "unknown label"])
def test_runs_that_would_merge_or_mislabel_are_refused(tmp_path: Path, case: str) -> None:
    plain = run_file(tmp_path, "plain", "plain", [load("random_c1", 100.0)])
    serve = run_file(tmp_path, "serve", "serve", [load("random_c1", 95.0)])
    if case == "duplicate label":
        copy = tmp_path / "again.json"
        copy.write_text(serve.read_text())
        r = report(tmp_path, str(plain), str(serve), str(copy))
        assert r.returncode != 0 and "two runs labelled 'serve'" in r.stderr
    else:
        r = report(tmp_path, str(plain), str(serve), "--run-commit", "stock=" + "c" * 40)
        assert r.returncode != 0 and "no run labelled 'stock'" in r.stderr
    assert not (tmp_path / "r.json").exists()


def test_plain_vllm_gets_the_files_port_engine_flags_and_engine_env(tmp_path: Path) -> None:
    """What the ``plain`` phase starts, from deployments/tiny.yaml as resolved here (no server started)."""
    import importlib.metadata
    import importlib.util

    loaded = importlib.util.spec_from_file_location("serve_vs_plain", SCRIPT)
    script = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(script)
    spec, port = script.resolved(ROOT / "deployments" / "tiny.yaml", [f"model.source={tmp_path}"], str(tmp_path))
    assert port == 8000 and spec.served_name == "tiny-qwen2.5-vl"
    assert script.plain_env(spec) == {"VLLM_CPU_KVCACHE_SPACE": "2", "TORCHDYNAMO_DISABLE": "1"}
    cmd = script.plain_command(spec, port)
    assert cmd[cmd.index("--port") + 1] == "8000" and "--enforce-eager" in cmd
    assert cmd[cmd.index("--max-model-len") + 1] == "4096" and cmd[cmd.index("--served-model-name") + 1] == spec.served_name
    try:
        importlib.metadata.version("vllm")
        assert cmd[1:4] == ["-m", "vllm.entrypoints.cli.main", "serve"]
    except importlib.metadata.PackageNotFoundError:  # the CPU build: its API server module
        assert cmd[1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"]


def test_the_ready_time_is_broken_down_from_the_logs_a_run_kept(tmp_path: Path) -> None:
    """Milestones from the server's output and the kept Ray logs, in time order, each with the step before it."""
    import io
    import tarfile

    serve = run_file(tmp_path, "serve", "serve", [load("random_c1", 95.0)])
    run = json.loads(serve.read_text())
    run.update(time="2026-11-28T10:00:00Z", ready_s=200.0)
    serve.write_text(json.dumps(run))
    logs = {  # and a session an earlier run left behind, whose lines are not this run's
        "fleetserve-head-0/session_latest/logs/raylet.out": "[2026-11-28 09:40:00,000 I 1 1] main.cc:281: Setting cluster ID to: y",
        "fleetserve-head-1/session_latest/logs/raylet.out": "[2026-11-28 10:00:20,500 I 1 1] main.cc:281: Setting cluster ID to: x",
        "fleetserve-head-1/session_latest/logs/serve/controller_7.log":
            "INFO 2026-11-28 10:00:30,000 controller 7 -- Deploying new app 'a'.\n"
            "INFO 2026-11-28 10:00:50,000 controller 7 -- Deploying new version of Deployment(name='FleetLLMServer:m')",
        "fleetserve-head-1/session_latest/logs/serve/replica_a_FleetLLMServer_m_x.log":
            "INFO 2026-11-28 10:01:10,000 a x -- Started initializing replica.\n"
            "INFO 2026-11-28 10:01:40,000 a x -- Clearing the current platform cache ...\n"
            "INFO 2026-11-28 10:03:10,000 a x -- Started vLLM engine.\n"
            "INFO 2026-11-28 10:03:19,000 a x -- Finished initializing replica.",
        "fleetserve-head-1/session_latest/logs/worker-ab-01000000-9.err":
            "(EngineCore pid=5) (Worker_TP0 pid=6) INFO 11-28 10:02:00 [model_runner.py:305] Model loading took 3 GiB",
    }
    with tarfile.open(tmp_path / "serve.ray-logs.tar.gz", "w:gz") as tar:
        for name, text in logs.items():
            data = text.encode()
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    plain = run_file(tmp_path, "plain", "plain", [load("random_c1", 100.0)])
    r = report(tmp_path, str(plain), str(serve))
    assert r.returncode == 0, r.stderr
    phases = json.loads((tmp_path / "r.json").read_text())["ready_phases"]
    assert phases["plain"] == []  # no start time recorded, so nothing to measure from
    assert [(p["milestone"], p["at_s"], p["step_s"]) for p in phases["serve"]] == [
        ("Ray head up (raylet)", 20.5, 20.5), ("Serve app deploy asked", 30.0, 9.5),
        ("app built in the cluster", 50.0, 20.0), ("replica actor running", 70.0, 20.0),
        ("vLLM engine creation (config resolved)", 100.0, 30.0), ("engine core joined Ray", 120.0, 20.0),
        ("weights loaded", 120.0, 0.0),
        ("vLLM engine started", 190.0, 70.0), ("replica ready", 199.0, 9.0),
        ("ready (/health 200 to the client)", 200.0, 1.0)]
    assert "| replica actor running | 70.0 | 20.0 |" in r.stdout
