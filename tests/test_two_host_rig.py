"""The two-host GPU rig's CPU-only parts (benchmarks/gpu/two_host_rig.py; it runs on GPU machines only).

Fast, no Ray, no hosts: the GPU split, each host's environment and what sshd
accepts of it, the hostfile the rig writes (parsed by fleetserve's own parser),
the paths kept visible in a host's private /tmp, the probe's GPU count under
``CUDA_VISIBLE_DEVICES``, and the parsing of what comes back (NCCL_DEBUG lines,
Ray's actor table, the GPU readback, /health's FlagGems report, the merged
report).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
sys.path.insert(0, str(Path(__file__).parent))
import two_host_rig as rig  # noqa: E402
from hosts.emulation import EmulatedHost, HostEmulator, paths_kept_in_tmp, sshd_setenv  # noqa: E402

from cluster.fleet.hostfile import load_hostfile  # noqa: E402
from cluster.fleet.preflight import Probe, preflight  # noqa: E402
from cluster.fleet.remote.probe import visible_gpus  # noqa: E402


# ------------------------------------------------------------------------------- GPUs and environments


@pytest.mark.parametrize(("total", "split"), [(2, [[0], [1]]), (4, [[0, 1], [2, 3]]), (8, [[0, 1, 2, 3], [4, 5, 6, 7]])])
def test_gpus_split_evenly_in_order(total: int, split: list[list[int]]) -> None:
    assert rig.split_gpus(total) == split


@pytest.mark.parametrize("total", [0, 1, 3, 5])
def test_an_uneven_split_is_refused(total: int) -> None:
    with pytest.raises(ValueError, match="evenly"):
        rig.split_gpus(total)


def test_hosts_inherit_the_stack_but_nothing_that_names_one_host() -> None:
    environ = {"PATH": "/tmp/rigroot/wrap:/usr/bin", "PYTHONPATH": "/repo:/tmp/site", "LD_LIBRARY_PATH": "/usr/local/nvidia/lib64",
               "VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "0,1",
               "NCCL_HOSTID": "machine", "SSH_AUTH_SOCK": "/run/agent", "RAY_ADDRESS": "10.0.0.1:6379",
               "OPENAI_API_KEY": "secret", "NCCL_NVLS_ENABLE": "1", "NCCL_IB_HCA": 'has"quote'}
    env = rig.inherited_env(environ)
    assert env["PATH"] == environ["PATH"] and env["PYTHONPATH"] == environ["PYTHONPATH"]
    assert env["LD_LIBRARY_PATH"] == environ["LD_LIBRARY_PATH"] and env["HF_HUB_OFFLINE"] == "1"
    for key in ("CUDA_VISIBLE_DEVICES", "NCCL_HOSTID", "SSH_AUTH_SOCK", "RAY_ADDRESS", "OPENAI_API_KEY",
                "NCCL_IB_HCA"):
        assert key not in env, key
    # NVLink multicast stays off whatever the caller had.
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_DISABLE_NVLS"] == "1"


def test_each_host_owns_its_gpus_and_a_distinct_nccl_identity() -> None:
    base = rig.inherited_env({"PATH": "/usr/bin"})
    envs = [rig.host_env(i, gpus, base) for i, gpus in enumerate(rig.split_gpus(4), start=1)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3"]
    assert len({e["NCCL_HOSTID"] for e in envs}) == 2
    assert all(e["NCCL_NVLS_ENABLE"] == "0" for e in envs)
    line = sshd_setenv(envs[1])  # what the emulator writes into the host's sshd_config
    assert 'CUDA_VISIBLE_DEVICES="2,3"' in line and 'NCCL_HOSTID="fleetserve-rig-h2"' in line


@pytest.mark.parametrize(("env", "problem"), [({"BAD-NAME": "x"}, "not an environment variable name"),
                                              ({"A": 'x"y'}, "may not hold"), ({"A": "x\ny"}, "may not hold"),
                                              ({"A": "x\\y"}, "may not hold")])
def test_sshd_setenv_refuses_what_sshd_would_misread(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        sshd_setenv(env)
    assert sshd_setenv({}) == ""


def test_only_existing_outermost_tmp_paths_are_kept(tmp_path: Path) -> None:
    assert tmp_path.resolve().is_relative_to("/tmp"), "pytest's tmp_path lies under /tmp here"
    outer, inner, missing = tmp_path / "site", tmp_path / "site" / "pkg", tmp_path / "nope"
    inner.mkdir(parents=True)
    kept = paths_kept_in_tmp([inner, outer, missing, Path("/work"), Path("/tmp"), outer])
    assert kept == [outer.resolve()]


# ------------------------------------------------------------------------------- the hostfile


def test_the_rig_hostfile_parses_and_carries_nccl_logging_and_safety(tmp_path: Path) -> None:
    emu = HostEmulator(tmp_path, sshd="/usr/sbin/sshd")
    for i in (1, 2):
        emu.hosts[i] = EmulatedHost(i, f"10.203.0.{10 + i}", f"fs-h{i}", f"fsv{i}", tmp_path / f"fs-h{i}")
    settings = rig.cluster_settings(tmp_path, "/usr/bin/python3", str(tmp_path / "ray"), 8, gpu=True)
    path = emu.hostfile(slots=2, path=tmp_path / "hostfile", settings=settings)
    config = load_hostfile(path)
    assert [(h.address, h.slots) for h in config.hosts] == [("10.203.0.11", 2), ("10.203.0.12", 2)]
    assert config.head.address == "10.203.0.11"
    s = config.settings
    assert s.name == "rig" and s.ray.python == "/usr/bin/python3" and s.ray.num_cpus == 8
    assert s.ray.object_store_memory == 4 << 30 and s.ray.temp_dir == "/run/fleetserve-ray"
    assert s.env["NCCL_DEBUG"] == "INFO" and s.env["NCCL_DEBUG_FILE"] == f"{tmp_path}/nccl/emulated.%h.%p.log"
    assert s.env["NCCL_NVLS_ENABLE"] == "0" and s.env["NVSHMEM_DISABLE_NVLS"] == "1"
    # The per-host identity is the hosts' own (sshd SetEnv), never cluster-wide.
    assert "CUDA_VISIBLE_DEVICES" not in s.env and "NCCL_HOSTID" not in s.env


# ------------------------------------------------------------------------------- the probe under CUDA_VISIBLE_DEVICES

ROWS = [("0", "GPU-aaaa1111", "NVIDIA H100 80GB HBM3"), ("1", "GPU-bbbb2222", "NVIDIA H100 80GB HBM3"),
        ("2", "GPU-cccc3333", "NVIDIA H100 80GB HBM3"), ("3", "GPU-dddd4444", "NVIDIA H100 80GB HBM3")]


@pytest.mark.parametrize(("cvd", "count"), [(None, 4), ("1", 1), ("2,3", 2), ("GPU-bbbb", 1), ("GPU-cccc3333,0", 2),
                                            ("", 0), ("1,7,2", 1), ("0,0", 1), ("GPU-", 0)])
def test_the_probe_counts_the_gpus_cuda_would_show(cvd: str | None, count: int) -> None:
    # CUDA ignores everything from the first entry naming no (single) GPU on; "GPU-" matches all: ambiguous.
    assert len(visible_gpus(ROWS, cvd)) == count


def test_the_probe_program_reads_nvidia_smi_and_the_hosts_cuda_visible_devices(tmp_path: Path) -> None:
    import json
    import os
    import subprocess

    fake = tmp_path / "nvidia-smi"  # the real one's CSV for --query-gpu=index,uuid,name --format=csv,noheader
    fake.write_text("#!/bin/sh\nprintf '0, GPU-aaaa1111, NVIDIA H100 80GB HBM3\\n1, GPU-bbbb2222, NVIDIA H200\\n'\n")
    fake.chmod(0o755)
    args = json.dumps({"packages": {}, "ports": [], "head_ip": "127.0.0.1", "head_port": 6379, "start_pidfile": None})
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "1"}
    probe = ROOT / "cluster" / "fleet" / "remote" / "probe.py"
    out = json.loads(subprocess.run([sys.executable, str(probe), args], env=env, capture_output=True, text=True,
                                    timeout=60, check=True).stdout.splitlines()[-1])
    assert out["gpus"] == ["NVIDIA H200"] and out["gpus_on_machine"] == 2


def test_preflight_says_when_cuda_visible_devices_narrowed_the_gpus(tmp_path: Path) -> None:
    hf = tmp_path / "hostfile"
    hf.write_text("10.0.0.1 slots=2\n")
    config = load_hostfile(hf)
    probe = Probe("10.0.0.1", "3.12", "python3", {"ray": "2.58.0", "vllm": "0.26.0", "torch": "2.11"},
                  ["H100"], 1 << 34, [], {"10.0.0.1": "eth0"}, "10.0.0.1", "eth0", [],
                  raw={"gpus_on_machine": 4})
    problems = preflight(config, {"10.0.0.1": probe}, [], "10.0.0.1:6379")
    assert "nvidia-smi shows 1 GPU(s) (4 on the machine, CUDA_VISIBLE_DEVICES there narrows them) but slots=2" \
        in problems["10.0.0.1"]


# ------------------------------------------------------------------------------- what comes back

NCCL_LINES = """\
fs-h1:4121:4121 [0] NCCL INFO NCCL_SOCKET_IFNAME set by environment to eth0
fs-h1:4121:4121 [0] NCCL INFO NET/Socket : Using [0]eth0:10.203.0.11<0>
fs-h1:4121:4121 [0] NCCL INFO Using network Socket
fs-h1:4121:4180 [0] NCCL INFO comm 0x55d5c8a0 rank 0 nRanks 2 nNodes 2 localRanks 1 localRank 0 MNNVL 0
fs-h1:4121:4180 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] [send] via NET/Socket/0
fs-h2:3907:3951 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] [receive] via NET/Socket/0
fs-h2:3907:3951 [0] NCCL INFO Channel 01/0 : 1[1] -> 0[0] [send] via NET/Socket/0
a line vLLM printed, not NCCL's
""".splitlines()

SINGLE_LINES = """\
gpu-box:100:100 [0] NCCL INFO Channel 00/1 : 0[0] -> 1[1] via P2P/CUMEM/read
gpu-box:100:100 [0] NCCL INFO Channel 01/1 : 0[0] -> 1[1] via P2P/CUMEM/read
gpu-box:101:101 [1] NCCL INFO Channel 00/0 : 1[1] -> 0[0] via SHM/direct/direct
gpu-box:101:101 [1] NCCL INFO comm 0x1 rank 1 nRanks 2 nNodes 1 localRanks 2 localRank 1 MNNVL 0
""".splitlines()


def test_nccl_lines_give_transports_network_and_nodes() -> None:
    two = rig.nccl_summary(NCCL_LINES)
    assert two["transports"] == {"NET/Socket": 3} and two["networks"] == ["Socket"]
    assert two["interfaces"] == ["Socket: [0]eth0:10.203.0.11<0>"] and two["nnodes"] == [2]
    assert two["hosts"] == ["fs-h1", "fs-h2"] and two["info_lines"] == 7
    one = rig.nccl_summary(SINGLE_LINES)
    assert one["transports"] == {"P2P/CUMEM": 2, "SHM": 1} and one["nnodes"] == [1] and one["networks"] == []


def actor(name: str, node: str) -> dict:
    return {"name": name, "class_name": "RayWorkerProc", "node_id": node, "pid": 1}


NODES = {"n1": "10.203.0.11", "n2": "10.203.0.12"}


def test_each_stage_on_its_own_host_read_from_worker_names() -> None:
    state = {"nodes": NODES, "actors": [actor("vllm_Worker_ab12_PP0", "n1"), actor("vllm_Worker_ab12_PP1", "n2"),
                                        actor("", "n1"), actor("SERVE_REPLICA::qwen#x", "n1")]}
    stages = rig.stage_hosts(state, pp=2)
    assert stages == {0: ["10.203.0.11"], 1: ["10.203.0.12"]}
    assert rig.placement_problems(stages, 2) == []
    tp2 = {"nodes": NODES, "actors": [actor(f"vllm_Worker_ab_TP{t}_PP{p}", f"n{p + 1}") for t in (0, 1) for p in (0, 1)]}
    assert rig.stage_hosts(tp2, pp=2) == {0: ["10.203.0.11"], 1: ["10.203.0.12"]}


def test_a_stage_across_hosts_or_two_stages_on_one_host_is_a_problem() -> None:
    split = {"nodes": NODES, "actors": [actor("vllm_Worker_x_TP0_PP0", "n1"), actor("vllm_Worker_x_TP1_PP0", "n2"),
                                        actor("vllm_Worker_x_TP0_PP1", "n2"), actor("vllm_Worker_x_TP1_PP1", "n2")]}
    problems = rig.placement_problems(rig.stage_hosts(split, 2), 2)
    assert any("stage 0 spans 2 hosts" in p for p in problems) and any("holds 2 stages" in p for p in problems)
    assert "expected 0..1" in rig.placement_problems({0: ["10.203.0.11"]}, 2)[0]


EXPECTED = {"10.203.0.11": {"gpus": [0], "hostname": "fs-h1", "nccl_hostid": "fleetserve-rig-h1", "iface": "eth0"},
            "10.203.0.12": {"gpus": [1], "hostname": "fs-h2", "nccl_hostid": "fleetserve-rig-h2", "iface": "eth0"}}


def readback(i: int, gpus: float = 1, **changes: object) -> dict:
    env = {"CUDA_VISIBLE_DEVICES": str(i - 1), "NCCL_HOSTID": f"fleetserve-rig-h{i}", "NCCL_SOCKET_IFNAME": "eth0",
           "GLOO_SOCKET_IFNAME": "eth0", "VLLM_HOST_IP": f"10.203.0.1{i}", **rig.SAFETY_ENV}
    task = {"hostname": f"fs-h{i}", "node_ip": f"10.203.0.1{i}", "ray_gpu_ids": ["0"], "env": env,
            "cuda_devices": [f"GPU-{i}"]}
    task.update(changes)
    return {"node_id": f"n{i}", "ip": f"10.203.0.1{i}", "gpus": gpus, "cpus": 8, "task": task}


def test_the_gpu_readback_matches_each_hosts_own_gpus_name_and_env() -> None:
    assert rig.ray_gpu_problems({"nodes": [readback(1), readback(2)]}, EXPECTED) == []
    wrong_env = readback(2, env={**readback(2)["task"]["env"], "CUDA_VISIBLE_DEVICES": "0"})
    problems = rig.ray_gpu_problems({"nodes": [readback(1), wrong_env, ]}, EXPECTED)
    assert problems == ["10.203.0.12: a Ray task there sees CUDA_VISIBLE_DEVICES='0', expected '1'"]
    shared = rig.ray_gpu_problems({"nodes": [readback(1), readback(2, cuda_devices=["GPU-1"], hostname="fs-h1")]},
                                  EXPECTED)
    assert any("runs on host 'fs-h1'" in p for p in shared) and any("seen by two hosts" in p for p in shared)
    missing = rig.ray_gpu_problems({"nodes": [readback(1, gpus=2)]}, EXPECTED)
    assert "10.203.0.11: Ray offers 2 GPU(s), expected 1" in missing and "10.203.0.12: no alive Ray node" in missing


def test_the_up_summary_must_show_the_bridge_interface_and_each_hosts_gpus() -> None:
    summary = {"hosts": {"10.203.0.11": {"iface": "eth0", "gpus": ["H100"]},
                         "10.203.0.12": {"iface": "docker0", "gpus": ["H100", "H100"]}}}
    problems = rig.up_problems(summary, {"10.203.0.11": 1, "10.203.0.12": 1})
    assert problems == ["10.203.0.12: preflight picked interface 'docker0', not 'eth0'",
                        "10.203.0.12: preflight saw ['H100', 'H100'], expected 1 GPU(s)"]
    cpu = {"hosts": {"10.203.0.11": {"iface": "eth0", "gpus": None}}}
    assert rig.up_problems(cpu, {"10.203.0.11": None}) == []


def test_flaggems_reports_grouped_by_host() -> None:
    def rep(host: str, pid: int, status: str = "active") -> dict:
        return {"hostname": host, "pid": pid, "process": "ray::RayWorkerProc", "status": status,
                "ops": {"rms_norm": {"status": "patched"}, "silu_and_mul": {"status": "patched"}}}

    health = {"models": {"M": {"flaggems": {"summary": {"status": "active", "failed": [],
                                                         "triton_ops": ["rms_norm", "silu_and_mul"]},
                                             "processes": [rep("fs-h1", 10), rep("fs-h1", 11), rep("fs-h2", 10)]}}}}
    report = rig.gems_by_host(health, "M")
    assert sorted(report["hosts"]) == ["fs-h1", "fs-h2"] and len(report["hosts"]["fs-h1"]) == 2
    assert report["hosts"]["fs-h2"][0]["ops"] == {"rms_norm": "patched", "silu_and_mul": "patched"}
    assert rig.gems_problems(report, ["fs-h1", "fs-h2"]) == []
    health["models"]["M"]["flaggems"]["processes"] = [rep("fs-h1", 10), rep("fs-h1", 12, "fallback")]
    problems = rig.gems_problems(rig.gems_by_host(health, "M"), ["fs-h1", "fs-h2"])
    assert problems == ["no FlagGems report from a process on fs-h2", "fs-h1 pid 12: status fallback"]


# ------------------------------------------------------------------------------- phases, loads, report


def test_phases_bring_their_prerequisites_and_keep_their_order() -> None:
    assert rig.parse_phases("bench", False) == ["up", "serve", "bench"]
    assert rig.parse_phases("single", False) == ["single"]
    assert rig.parse_phases("fault,place,up", False) == ["up", "serve", "place", "fault"]
    assert rig.parse_phases("up", True) == ["up"]
    with pytest.raises(ValueError, match="only the 'up' phase"):
        rig.parse_phases("up,serve", True)
    with pytest.raises(ValueError, match="unknown phase"):
        rig.parse_phases("up,benchmark", False)


def test_loads_by_name() -> None:
    assert rig.load_names("") == rig.LOADS
    assert rig.load_names("random-mm_c16,random_c1") == [("random-mm", 16, 64), ("random", 1, 8)]
    with pytest.raises(ValueError, match="unknown load"):
        rig.load_names("random_c2")


def test_reports_of_several_calls_merge_into_the_ratio() -> None:
    def load(name: str, tok_s: float) -> dict:
        return {"load": name, "output_throughput": tok_s, "median_ttft_ms": 50.0, "median_tpot_ms": 20.0, "failed": 0}

    call1 = {"time": "2026-12-01T10:00:00Z", "commit": "abc", "device": "2 x H100", "phases": {
        "up": {"ok": True}, "bench": {"ok": True, "loads": [load("random_c1", 40.0), load("random_c16", 300.0)]}},
        "nccl_emulated": rig.nccl_summary(NCCL_LINES)}
    call2 = {"time": "2026-12-01T10:20:00Z", "commit": "abc", "device": "2 x H100", "phases": {
        "up": {"ok": False, "error": "later failure does not hide the earlier success"},
        "single": {"ok": True, "loads": [load("random_c1", 50.0), load("random_c16", 400.0)]}},
        "nccl_single": rig.nccl_summary(SINGLE_LINES)}
    merged = rig.merge_runs([call2, call1])
    assert merged["phases"]["up"]["ok"] is True
    assert [(r["load"], r["ratio"]) for r in merged["rows"]] == [("random_c1", 0.8), ("random_c16", 0.75)]
    assert merged["nccl"]["nccl_emulated"]["transports"] == {"NET/Socket": 3}
    assert merged["nccl"]["nccl_single"]["transports"] == {"P2P/CUMEM": 2, "SHM": 1}
    assert merged["not_run"] == ["serve", "place", "chat", "gems", "fault"]


def rig_report(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, rig.__file__, "report", *args, "--name", "r", "--results-dir", str(tmp)],
                          capture_output=True, text=True, timeout=120)


def test_a_run_commit_is_corrected_in_the_open_and_the_report_says_when_it_was_made(tmp_path: Path) -> None:
    import json

    def load(name: str, tok_s: float) -> dict:
        return {"load": name, "output_throughput": tok_s, "median_ttft_ms": 50.0, "median_tpot_ms": 20.0, "failed": 0}

    stale = "a" * 40 + "-dirty"
    across, single = tmp_path / "rig-up-serve-bench.json", tmp_path / "rig-single.json"
    across.write_text(json.dumps({"time": "2026-12-01T10:00:00Z", "commit": "b" * 40, "device": "2 x H100",
                                  "command": "python3 two_host_rig.py run --phases up,serve,bench", "phases": {
                                      "up": {"ok": True}, "bench": {"ok": True, "loads": [load("random_c1", 40.0)]}}}))
    single.write_text(json.dumps({"time": "2026-12-01T10:20:00Z", "commit": stale, "device": "2 x H100",
                                  "command": "python3 two_host_rig.py run --phases single", "phases": {
                                      "single": {"ok": True, "loads": [load("random_c1", 50.0)]}}}))
    r = rig_report(tmp_path, str(across), str(single), "--run-commit", "rig-single=" + "c" * 40)
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "r.json").read_text())
    assert list(out)[1:4] == ["commit", "device", "time"] and out["time"].endswith("Z")
    assert out["commit"] == "c" * 40 and out["run_commits"] == ["b" * 40, "c" * 40]
    assert out["phases"]["single"]["commit"] == "c" * 40
    corrected = {"recorded": stale, "by": "--run-commit rig-single=" + "c" * 40}
    assert out["phases"]["single"]["commit_corrected"] == corrected
    assert out["phases"]["bench"]["commit"] == "b" * 40 and "commit_corrected" not in out["phases"]["bench"]
    assert [row["ratio"] for row in out["rows"]] == [0.8]

    r = rig_report(tmp_path / "refused", str(across), str(single), "--run-commit", "rig-up=" + "c" * 40)
    assert r.returncode != 0 and "0 run files named rig-up.json" in r.stderr
    assert not (tmp_path / "refused").exists()


def dry_run(tmp_path: Path, deadline_s: float = 540) -> rig.Run:
    import argparse

    args = argparse.Namespace(phases=["up"], out=str(tmp_path / "out" / "rig.json"), deadline_s=deadline_s, gpus=0,
                              model_size="32b", model_dir="", flaggems="off", loads="", set=[],
                              workdir=str(tmp_path / "work"), cpu_dry_run=True)
    run = rig.Run(args)
    run.configure()
    return run


def test_a_dry_run_plans_two_hosts_with_one_logical_gpu_each(tmp_path: Path) -> None:
    run = dry_run(tmp_path)
    assert run.split == [[0], [1]] and (run.tp, run.pp) == (1, 2)
    assert (run.key_file.stat().st_mode & 0o777) == 0o600
    sets = run.overrides()
    assert "tensor_parallel_size=1" in sets and "pipeline_parallel_size=2" in sets and "flaggems.enabled=false" in sets
    assert f"model.source={run.model_dir}" in sets and "model.served_name=Qwen2.5-VL-32B-Instruct" in sets


def test_a_phase_runs_only_with_its_prerequisites_and_time_and_is_written_at_once(tmp_path: Path) -> None:
    import json

    run = dry_run(tmp_path, deadline_s=100)
    assert run.phase("up", 10, lambda: {"problems": ["preflight picked lo"]}) is False
    assert run.phase("serve", 10, lambda: {}, needs=["up"]) is False
    assert run.phase("single", 1000, lambda: {}) is False
    assert run.phase("chat", 10, lambda: {"answered": 2}) is True
    assert run.phase("bench", 10, lambda: 1 / 0) is False
    written = json.loads(Path(run.args.out).read_text())["phases"]
    assert written["up"]["problems"] == ["preflight picked lo"] and written["serve"]["skipped"] == "up failed"
    assert written["single"]["skipped"].endswith("needs 1000s") and written["chat"]["ok"] is True
    assert written["bench"]["error"].startswith("ZeroDivisionError")
