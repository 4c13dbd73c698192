"""Unit tests for placement, Ray/docker command lines and the preflight rules (no hosts needed)."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from cluster.errors import ConfigError
from cluster.fleet.bringup import ClusterError, RayCluster
from cluster.fleet.hostfile import parse_hostfile_text
from cluster.fleet.preflight import Probe, parse_size, preflight
from cluster.fleet.raystart import node_env
from cluster.fleet.ssh import known_hosts_name
from cluster.serving.placement import PlacementError, check_stage_locality, replica_placement, worker_layout

# ---------------------------------------------------------------------- placement


def _deployment_bundles(tp: int, pp: int, **placement) -> dict:
    """What ray.serve.llm derives from our placement config: the replica's PG bundles and strategy.

    Read from its engine config (Ray 2.58), which -- unlike the deployment options -- needs no Ray
    instance (``get_deployment_options`` reads the runtime context, which starts one).
    """
    from ray.serve.llm import LLMConfig

    cfg = LLMConfig(model_loading_config={"model_id": "m", "model_source": "/m"},
                    engine_kwargs={"tensor_parallel_size": tp, "pipeline_parallel_size": pp},
                    placement_group_config=replica_placement(pp, **placement)).get_engine_config()
    return {"strategy": cfg.placement_strategy, "bundles": cfg.placement_bundles}


def test_pp1_is_strict_pack_one_bundle_per_worker() -> None:
    pg = _deployment_bundles(8, 1)
    assert pg["strategy"] == "STRICT_PACK"
    assert pg["bundles"] == [{"GPU": 1, "CPU": 1.0}] * 8


def test_pp_gt1_is_pack_and_world_sized() -> None:
    pg = _deployment_bundles(2, 2, cpus_per_worker=0.5)
    assert pg["strategy"] == "PACK" and pg["bundles"] == [{"GPU": 1, "CPU": 0.5}] * 4
    assert _deployment_bundles(2, 2, strategy="SPREAD")["strategy"] == "SPREAD"
    for tp, pp in ((1, 1), (4, 3)):
        assert sum(b.get("GPU", 0) for b in _deployment_bundles(tp, pp)["bundles"]) == tp * pp


BUNDLES = [{"GPU": 1.0, "CPU": 1.0}] * 4


def test_stage_locality_two_nodes() -> None:
    stages = check_stage_locality(BUNDLES, {0: "nA", 1: "nA", 2: "nB", 3: "nB"}, 2, 2, driver_node="nA")
    assert stages == [{"nA"}, {"nB"}]


def test_stage_locality_driver_node_first_like_vllm() -> None:
    # bundles interleaved across nodes: vLLM groups workers by node, driver's first
    layout = worker_layout(BUNDLES, ["nB", "nA", "nB", "nA"], driver_node="nB")
    assert layout == [(0, "nB"), (2, "nB"), (1, "nA"), (3, "nA")]
    assert check_stage_locality(BUNDLES, ["nB", "nA", "nB", "nA"], 2, 2, driver_node="nB") == [{"nB"}, {"nA"}]


def test_stage_split_across_nodes_is_named() -> None:
    with pytest.raises(PlacementError) as err:
        check_stage_locality(BUNDLES, ["nA", "nA", "nA", "nB"], 2, 2, driver_node="nA")
    assert "stage 1 on nA, nB" in str(err.value) and "multiple of tp=2" in str(err.value)
    with pytest.raises(PlacementError, match="vLLM needs 4"):
        check_stage_locality(BUNDLES[:3], ["nA"] * 3, 2, 2)


# ------------------------------------------------------------- commands + preflight

HOSTFILE = """
10.0.0.1 slots=8 type=H100
10.0.0.2 slots=4 ip=192.168.0.2
[cluster]
ray.num_cpus = 16
ray.temp_dir = /run/ray
env.NCCL_DEBUG = INFO
"""


def cluster(text: str = HOSTFILE) -> RayCluster:
    return RayCluster(parse_hostfile_text(text, "hf"))


def probe(host: str, **kw) -> Probe:
    base = dict(python="3.11.9", executable="/venv/bin/python", packages={"ray": "2.58.0", "vllm": "0.26.0", "torch": "2.11.0"},
                gpus=None, shm_bytes=64 << 30, busy_ports=[], addresses={host: "ens5", "127.0.0.1": "lo"},
                src_ip=host, iface="ens5", ray_pids=[])
    base.update(kw)
    return Probe(host=host, **base)


def test_ray_start_head_and_worker() -> None:
    rc = cluster()
    head, worker = rc.config.hosts
    h = shlex.split(rc.node.ray_start_command(head))
    assert h[:2] == ["ray", "start"] and "--head" in h and "--port=6379" in h
    assert "--node-ip-address=10.0.0.1" in h and "--num-gpus=8" in h and "--num-cpus=16" in h
    assert "--temp-dir=/run/ray" in h and "--dashboard-host=10.0.0.1" in h  # the cluster address, not 0.0.0.0
    assert '--resources={"accelerator_type:H100": 1}' in h
    w = shlex.split(rc.node.ray_start_command(worker))
    assert "--address=10.0.0.1:6379" in w and "--node-ip-address=192.168.0.2" in w and "--num-gpus=4" in w
    assert "--head" not in w


def test_node_env_sets_nccl_gloo_vllm_ip_and_what_the_serving_layer_passes() -> None:
    from cluster.commands.cluster_cmds import open_cluster

    rc = open_cluster(parse_hostfile_text(HOSTFILE, "hf"))
    worker = rc.config.hosts[1]
    env = node_env(rc.config, worker, probe("192.168.0.2", iface="ib0"), rc.extra_env)
    assert env == {"NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "ib0",
                   "VLLM_HOST_IP": "192.168.0.2",
                   "RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH": "cluster.serving.drain:install"}
    assert "RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH" not in node_env(rc.config, worker, probe("192.168.0.2"))


def test_drain_refuses_the_head_before_touching_any_host() -> None:
    rc = cluster()
    with pytest.raises(ClusterError, match="is the head"):
        rc.drain("10.0.0.1")
    with pytest.raises(ConfigError, match="no host '10.9.9.9'"):
        rc.drain("10.9.9.9")


def test_serve_controller_callback_installs_a_drain_aware_node_cache(monkeypatch) -> None:
    import ray.serve._private.controller as controller
    from ray.serve._private.cluster_node_info_cache import DefaultClusterNodeInfoCache

    from cluster.serving.drain import CONTROLLER_CALLBACK, install
    from ray._common.utils import import_attr

    monkeypatch.setattr(controller, "create_cluster_node_info_cache", controller.create_cluster_node_info_cache)
    assert import_attr(CONTROLLER_CALLBACK) is install
    install()
    cache_cls = controller.create_cluster_node_info_cache
    assert issubclass(cache_cls, DefaultClusterNodeInfoCache) and cache_cls.__name__ == "DrainAwareNodeInfoCache"
    assert cache_cls(gcs_client=None).get_draining_nodes() == {}


def test_docker_mode_commands() -> None:
    rc = cluster("10.0.0.1 slots=8\n[cluster]\ndocker.image = reg/img:tag\ndocker.name = flagos\n"
                 "docker.shm_size = 32g\ndocker.volumes = [/nfs:/nfs]\n")
    host = rc.config.hosts[0]
    run = shlex.split(rc.node.docker_run_command(host, {"NCCL_SOCKET_IFNAME": "eth0"}))
    for flag in ("--net=host", "--ipc=host", "--gpus=all", "--shm-size=32g"):
        assert flag in run
    assert run[run.index("--name") + 1] == "flagos" and run[-3:] == ["reg/img:tag", "sleep", "infinity"]
    # env values come from the sourced env file (0600), never from argv; the token file is mounted read-only
    assert run[:2] == [".", "$HOME/.fleetserve/fleetserve.env"] and run[2] == "&&"
    assert "NCCL_SOCKET_IFNAME" in run and "NCCL_SOCKET_IFNAME=eth0" not in run and "/nfs:/nfs" in run
    assert "$RAY_AUTH_TOKEN_PATH:$RAY_AUTH_TOKEN_PATH:ro" in run
    assert rc.node.in_node("ray status") == "docker exec -i flagos sh -c 'ray status'"


def test_preflight_passes_on_matching_hosts() -> None:
    rc = cluster()
    probes = {"10.0.0.1": probe("10.0.0.1"), "10.0.0.2": probe("192.168.0.2")}
    assert preflight(rc.config, probes, list(rc.config.hosts), rc.address) == {}


def test_preflight_names_each_problem() -> None:
    rc = cluster()
    probes = {
        "10.0.0.1": probe("10.0.0.1", busy_ports=[6379], gpus=["H100"] * 8),
        "10.0.0.2": probe("192.168.0.2", packages={"ray": "2.57.0", "vllm": "0.26.0", "torch": "2.11.0"},
                          python="3.11.4", gpus=["H100"] * 2, shm_bytes=64 << 20, iface=None, ray_pids=[42]),
    }
    problems = preflight(rc.config, probes, list(rc.config.hosts), rc.address)
    assert "port(s) 6379 already in use" in problems["10.0.0.1"]
    w = problems["10.0.0.2"]
    assert "version mismatch with the head: python 3.11.4 (head: 3.11.9), ray 2.57.0 (head: 2.58.0)" in w
    assert "nvidia-smi shows 2 GPU(s) but slots=4 (fix: set slots=2)" in w
    assert "/dev/shm is 64.0 MiB" in w and "no interface reaches the head" in w
    assert "Ray is already running here" in w


def test_preflight_skips_start_checks_for_joined_hosts() -> None:
    rc = cluster()
    probes = {"10.0.0.1": probe("10.0.0.1", busy_ports=[6379], ray_pids=[7]), "10.0.0.2": probe("192.168.0.2")}
    assert preflight(rc.config, probes, [rc.config.hosts[1]], rc.address) == {}  # head already runs Ray: its ports are Ray's own


def test_preflight_wrong_ip_and_required_version() -> None:
    rc = cluster(HOSTFILE + "ray.version = 2.57.0\n")
    probes = {"10.0.0.1": probe("10.0.0.1"), "10.0.0.2": probe("192.168.0.2", addresses={"10.9.9.9": "eth0"})}
    problems = preflight(rc.config, probes, list(rc.config.hosts), rc.address)
    assert "ray 2.58.0 but ray.version = 2.57.0" in problems["10.0.0.1"]
    assert "address 192.168.0.2 is not on this host" in problems["10.0.0.2"]


def test_sizes_and_known_hosts_names() -> None:
    assert parse_size("32g") == 32 << 30 and parse_size("512m") == 512 << 20 and parse_size("100") == 100
    assert known_hosts_name("10.0.0.1", 22) == "10.0.0.1" and known_hosts_name("h", 2222) == "[h]:2222"


def test_node_env_file_quotes_values_and_carries_the_token_path() -> None:
    rc = cluster("10.0.0.1 slots=1\n[cluster]\nenv.HF_TOKEN = hf_abc 'x'\n")
    text = rc.node.env_file_text({"HF_TOKEN": "hf_abc 'x'"})
    out = subprocess.run(["sh", "-c", text + 'printf "%s|%s|%s" "$HF_TOKEN" "$RAY_AUTH_MODE" "$RAY_AUTH_TOKEN_PATH"'],
                         capture_output=True, text=True, env={"HOME": "/h"})
    assert out.stdout == "hf_abc 'x'|token|/h/.fleetserve/fleetserve.token"
    assert rc.node.in_node("ray status").endswith("; ray status")  # sources the env file first


def test_secrets_are_redacted_in_errors_and_progress() -> None:
    rc = cluster("10.0.0.1 slots=1\n[cluster]\nenv.HF_TOKEN = hf_secretvalue\nenv.X = 1\n")
    err = ClusterError("x", {"10.0.0.1": "timed out: env HF_TOKEN=hf_secretvalue X=1 ray start"}, rolled_back=[])
    out = str(err.redacted(rc.redact))
    assert "hf_secretvalue" not in out and "HF_TOKEN=***" in out and "X=1" in out
    assert "rolled back" in out
    from cluster.commands.progress import Progress

    lines = []
    shown = Progress(["h"])
    shown.console.print = lambda msg, **kw: lines.append(msg)  # type: ignore[method-assign]
    rc = RayCluster(rc.config, progress=lambda hosts, title: shown)
    with rc._progress(["h"], "t") as progress:  # what the fleet layer hands its progress: redacted already
        progress.update("h", "ray start failed: HF_TOKEN=hf_secretvalue")
        progress.note("note HF_TOKEN=hf_secretvalue")
    assert lines == ["[h] ray start failed: HF_TOKEN=***", "note HF_TOKEN=***"]


def test_rollback_failure_is_not_reported_as_rolled_back() -> None:
    err = ClusterError("ray start failed; rolled back", {"h2": "cut off"}, rolled_back=["h1"],
                       rollback_failed={"h2": "LEFT raylet"})
    assert "rolled back (no Ray process left, checked on the host): h1" in str(err)
    assert "ROLLBACK FAILED on h2: LEFT raylet" in str(err)


def test_auth_is_on_by_default_and_loud_when_off(tmp_path, capsys) -> None:
    rc = cluster()
    assert rc.ray.auth == "token"
    rc = RayCluster(parse_hostfile_text("10.0.0.1 slots=1\n[cluster]\nray.auth = disabled\n", "hf"),
                    state_dir=tmp_path)
    assert "WARNING: Ray token authentication is OFF" in capsys.readouterr().err


def test_token_file_is_private_and_made_once_per_cluster(tmp_path) -> None:
    rc = RayCluster(parse_hostfile_text("10.0.0.1 slots=1\n", "hf"), state_dir=tmp_path)
    token = rc._token(fresh=True)
    assert rc.token_file.parent.parent == tmp_path and (rc.token_file.stat().st_mode & 0o777) == 0o600
    assert rc._token(fresh=False) == token and len(token) == 64
    assert rc._token(fresh=True) != token  # a new cluster (head started again) gets a new one


def test_classify_finds_dead_duplicate_missing_and_extra() -> None:
    rc = cluster()
    nodes = [{"ip": "10.0.0.1", "alive": True, "node_id": "a"},
             {"ip": "192.168.0.2", "alive": True, "node_id": "b"}, {"ip": "192.168.0.2", "alive": True, "node_id": "c"},
             {"ip": "10.9.9.9", "alive": True, "node_id": "d"}]
    assert rc._classify(nodes) == {"hosts": {"10.0.0.1": "alive", "10.0.0.2": "duplicate"}, "extra": ["10.9.9.9"]}
    nodes = [{"ip": "10.0.0.1", "alive": True, "node_id": "a"}, {"ip": "192.168.0.2", "alive": False, "node_id": "b"}]
    assert rc._classify(nodes)["hosts"]["10.0.0.2"] == "dead"
    assert rc._classify(nodes[:1])["hosts"]["10.0.0.2"] == "missing"


def test_serve_summary_after_a_lost_host() -> None:
    """A replica still STOPPING on a dead node is counted in states, not as a node holding replicas."""
    from cluster.serving.status import summarize

    replicas = [
        {"replica_id": "a", "state": "RUNNING", "node_ip": "10.0.0.3"},
        {"replica_id": "b", "state": "STOPPING", "node_ip": None},  # its host is gone
        {"replica_id": "c", "state": "STARTING", "node_ip": "10.0.0.4"},
    ]
    details = {"applications": {"app": {"deployments": {"LLM": {
        "status": "UPSCALING", "target_num_replicas": 2, "replicas": replicas,
        "deployment_config": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3,
                                                     "target_ongoing_requests": 2}}}}}}}
    (row,) = summarize(details)
    assert row.states == {"RUNNING": 1, "STOPPING": 1, "STARTING": 1}
    assert row.nodes == {"10.0.0.3": 1, "10.0.0.4": 1}
    assert row.running_replicas == 1 and row.autoscaling == "1..3 @2"


def test_up_help_shows_the_cluster_section() -> None:
    from typer.testing import CliRunner

    from cluster.cli import app

    out = CliRunner().invoke(app, ["up", "--help"], env={"COLUMNS": "200"}).output
    assert "optional [cluster] section" in out  # rich markup once ate "[cluster]"


def test_drain_runs_check_then_drain_then_wait_on_the_head_and_stops_ray() -> None:
    """The fleet drives the drain; the workload's program (the serving layer's) says when it may and when it is done."""
    import json as json_

    from cluster.fleet.remote import drain as drain_program
    from cluster.fleet.remote import program_source
    from cluster.fleet.ssh import CommandResult
    from cluster.serving.remote import drain_wait

    rc = cluster()
    sources = {program_source(drain_wait): "workload", program_source(drain_program): "drain"}
    calls: list[tuple[str, dict]] = []

    class Pool:
        def run(self, host, cmd, stdin=None, timeout=None, on_line=None):
            if stdin is None:  # stop_host
                calls.append(("stop", {"host": host.name}))
                return CommandResult(host.name, cmd, 0, "", "", 0.0)
            args = json_.loads(shlex.split(cmd.rsplit("; ", 1)[-1])[-1])
            name = sources[stdin]
            calls.append((name, args))
            assert args["ray_init"]["_node_ip_address"] == "10.0.0.1" and args["address"] == "10.0.0.1:6379"
            out = {("workload", "check"): {"interrupted_replicas": []}, ("drain", None): {"node_id": "n2"},
                   ("workload", "wait"): {"seconds": 1.5}}[(name, args.get("phase"))]
            if on_line:
                on_line("stdout", "PROGRESS replicas here: none")
            return CommandResult(host.name, cmd, 0, "PROGRESS x\nRESULT " + json_.dumps(out) + "\n", "", 0.0)

        def close(self):
            pass

    rc.pool = Pool()
    res = rc.drain("10.0.0.2", timeout=30, workload=drain_wait)
    assert [c[0] for c in calls] == ["workload", "drain", "workload", "stop"]
    assert calls[0][1]["phase"] == "check" and calls[2][1] == {**calls[2][1], "phase": "wait", "node_id": "n2"}
    assert res["node_id"] == "n2" and res["seconds_to_empty"] == 1.5 and res["interrupted_replicas"] == []

    # the workload's refusal stops the drain before Ray is asked to drain anything
    calls.clear()
    refused = {"error": "replicas with workers on this node run their actor elsewhere", "fix": "pass --force"}
    rc.pool.run = lambda host, cmd, stdin=None, timeout=None, on_line=None: (  # type: ignore[method-assign]
        calls.append(("run", {})) or CommandResult(host.name, cmd, 0, "RESULT " + json_.dumps(refused), "", 0.0))
    with pytest.raises(ClusterError, match="cannot drain 10.0.0.2: replicas with workers") as err:
        rc.drain("10.0.0.2", workload=drain_wait)
    assert err.value.problems == {"10.0.0.2": "pass --force"} and len(calls) == 1


def test_serve_on_a_recorded_cluster_that_is_gone_says_so_at_once(tmp_path) -> None:
    """A record `fleetserve up` left whose cluster no longer answers: a clear error naming it and the fix,
    not Ray's 20 s of connect retries and a traceback; `down` of that cluster forgets the record."""
    import json
    import socket
    from pathlib import Path

    from typer.testing import CliRunner

    from cluster.cli import app
    from cluster.fleet.state import forget_cluster, record_cluster, state_file

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    record_cluster(tmp_path, tmp_path / "hostfile", "127.0.0.1:6379", f"http://127.0.0.1:{port}", None)
    config = Path(__file__).resolve().parents[1] / "deployments" / "tiny.yaml"
    out = CliRunner().invoke(app, ["serve", str(config)], env={"FLEETSERVE_STATE_DIR": str(tmp_path),
                                                               "COLUMNS": "200", "RAY_ADDRESS": ""})
    assert out.exit_code != 0
    assert "the cluster `fleetserve up` recorded (127.0.0.1:6379) does not answer" in out.output, out.output
    assert str(state_file(tmp_path)) in out.output

    forget_cluster(tmp_path, "10.0.0.1:6379")  # another cluster's down: the record stays
    assert json.loads(state_file(tmp_path).read_text())["address"] == "127.0.0.1:6379"
    forget_cluster(tmp_path, "127.0.0.1:6379")
    assert not state_file(tmp_path).exists()
