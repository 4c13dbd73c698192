"""Integration: fleetserve up/status/exec/down on real sshd hosts emulated with namespaces.

Runs as root (CI); skips with the reason elsewhere. Hosts: fs-h1..fs-h3 (the
cluster), fs-h4 (added later), fs-h5 (a different ray version, faked with a
``ray-0.0.1.dist-info`` on its PYTHONPATH via sshd's SetEnv), fs-h6 (``ray
start`` fails there, via a sitecustomize on its PYTHONPATH).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hosts.emulation import HostEmulator  # noqa: E402
from hosts.fixtures import cli  # noqa: E402
from waiting import wait_for  # noqa: E402

from cluster.fleet.hostfile import load_hostfile  # noqa: E402
from cluster.commands.cluster_cmds import cluster_status, open_cluster  # noqa: E402
from cluster.fleet.bringup import ClusterError, RayCluster  # noqa: E402
from cluster.serving.placement import check_stage_locality  # noqa: E402

pytestmark = [pytest.mark.hosts, pytest.mark.slow, pytest.mark.timeout(900)]

RAY_PROCS = {"raylet", "gcs_server"}


def ray_running(emu: HostEmulator, index: int) -> set[str]:
    return RAY_PROCS & set(emu.hosts[index].process_names())


def ray_pids(emu: HostEmulator, index: int) -> set[int]:
    out = set()
    for pid in emu.hosts[index].pids():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() in RAY_PROCS:
                out.add(pid)
        except OSError:
            pass
    return out


def wait_no_ray(emu: HostEmulator, indices: list[int], timeout: float = 30) -> None:
    wait_for(lambda: not any(ray_running(emu, i) for i in indices), timeout, "no Ray left on the hosts",
             poll=0.5, state=lambda: {i: ray_running(emu, i) for i in indices if ray_running(emu, i)})


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


# ----------------------------------------------------------------- failures first


def test_malformed_hostfile_is_a_clear_error(three_hosts: HostEmulator, state_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.hostfile"
    bad.write_text("10.203.0.11 slots=2\n10.203.0.12 slot=2\n10.203.0.13 slots=two\n")
    r = cli("up", str(bad), state=state_dir)
    assert r.returncode == 1
    assert f"{bad}: line 2: unknown key 'slot'" in r.stderr and "did you mean 'slots'" in r.stderr
    assert f"{bad}: line 3: slots='two' is not a whole number" in r.stderr
    assert "Traceback" not in r.stderr
    assert not any(ray_running(three_hosts, i) for i in (1, 2, 3))


def test_unreachable_host(three_hosts: HostEmulator, state_dir: Path, tmp_path: Path) -> None:
    hf = three_hosts.hostfile([1, 2], extra_hosts=["10.203.0.99 slots=2"], path=tmp_path / "hf",
                              settings={"ssh.connect_timeout": "3"})
    r = cli("up", str(hf), state=state_dir)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "10.203.0.99: cannot connect" in r.stderr or "10.203.0.99: no answer" in r.stderr, r.stderr
    assert "nothing was started" in r.stderr
    wait_no_ray(three_hosts, [1, 2])


def test_wrong_client_key_and_changed_host_key(three_hosts: HostEmulator, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    hf = three_hosts.hostfile([1, 2], path=tmp_path / "hf", settings={"ssh.key": str(other)})
    with pytest.raises(ClusterError) as err, open_cluster(load_hostfile(hf)) as rc:
        rc.up()
    assert set(err.value.problems) == {"10.203.0.11", "10.203.0.12"}
    assert "authentication as 'root' with key" in err.value.problems["10.203.0.11"]

    # known_hosts has a different key for host 2 -> refused even with the trust flag
    wrong = tmp_path / "known_hosts"
    lines = three_hosts.known_hosts.read_text().splitlines()
    fake_pub = (tmp_path / "other_key.pub").read_text().split()
    wrong.write_text("\n".join(l if not l.startswith("10.203.0.12 ") else f"10.203.0.12 {fake_pub[0]} {fake_pub[1]}"
                               for l in lines) + "\n")
    hf = three_hosts.hostfile([1, 2], path=tmp_path / "hf2", settings={"ssh.known_hosts": str(wrong)})
    with pytest.raises(ClusterError) as err, open_cluster(load_hostfile(hf), trust_new_host_keys=True) as rc:
        rc.up()
    assert list(err.value.problems) == ["10.203.0.12"]
    assert "host key changed" in err.value.problems["10.203.0.12"]
    wait_no_ray(three_hosts, [1, 2])


def test_unknown_host_key_refused(three_hosts: HostEmulator, state_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "known_hosts"
    partial.write_text(three_hosts.hosts[1].host_key_line() + "\n")
    hf = three_hosts.hostfile([1, 2], path=tmp_path / "hf", settings={"ssh.known_hosts": str(partial)})
    r = cli("up", str(hf), state=state_dir)
    assert r.returncode == 1
    assert "10.203.0.12: host key ssh-ed25519 SHA256:" in r.stderr and "--trust-new-host-keys" in r.stderr, r.stderr
    assert "10.203.0.11:" not in r.stderr.split("nothing was started", 1)[1]
    assert partial.read_text().count("\n") == 1  # nothing recorded without the flag
    wait_no_ray(three_hosts, [1, 2])


def test_version_mismatch_on_one_host(three_hosts: HostEmulator, tmp_path: Path) -> None:
    fake = three_hosts.workdir / "fake-ray"
    (fake / "ray-0.0.1.dist-info").mkdir(parents=True, exist_ok=True)
    (fake / "ray-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ray\nVersion: 0.0.1\n")
    three_hosts.add_host(5, env={"PYTHONPATH": str(fake)})
    try:
        hf = three_hosts.hostfile([1, 2, 5], path=tmp_path / "hf")
        with pytest.raises(ClusterError) as err, open_cluster(load_hostfile(hf)) as rc:
            rc.up()
        assert list(err.value.problems) == ["10.203.0.15"]
        assert "version mismatch with the head: ray 0.0.1 (head: 2.58.0)" in err.value.problems["10.203.0.15"]
        assert "nothing was started" in str(err.value)
        wait_no_ray(three_hosts, [1, 2, 5])
    finally:
        three_hosts.remove_host(5)


def test_failed_start_rolls_back_what_this_run_started(three_hosts: HostEmulator, tmp_path: Path) -> None:
    site = three_hosts.workdir / "fail-start"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\nif sys.argv[1:2] == ['start']:\n    sys.exit('simulated failure: this host cannot start Ray')\n")
    three_hosts.add_host(6, env={"PYTHONPATH": str(site)})
    try:
        hf = three_hosts.hostfile([1, 2, 6], path=tmp_path / "hf")
        with pytest.raises(ClusterError) as err, open_cluster(load_hostfile(hf)) as rc:
            rc.up()
        assert list(err.value.problems) == ["10.203.0.16"], err.value
        assert "simulated failure" in err.value.problems["10.203.0.16"]
        # started by this run (the failed host counts: a failed start may leave daemons), then stopped again
        assert set(err.value.rolled_back) == {"10.203.0.11", "10.203.0.12", "10.203.0.16"}
        wait_no_ray(three_hosts, [1, 2, 6])
    finally:
        three_hosts.remove_host(6)


# --------------------------------------------------------------------- happy path


@pytest.fixture(scope="module")
def cluster3(three_hosts: HostEmulator, state_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """fleetserve up on fs-h1..3 (host 3's key is unknown: accepted with --trust-new-host-keys); down at the end."""
    work = tmp_path_factory.mktemp("cluster3")
    known = work / "known_hosts"
    known.write_text("".join(three_hosts.hosts[i].host_key_line() + "\n" for i in (1, 2)))
    hf = three_hosts.hostfile([1, 2, 3], path=work / "hostfile", settings={"ssh.known_hosts": str(known)})
    t0 = time.monotonic()
    r = cli("up", str(hf), "--trust-new-host-keys", "--json", state=state_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout)
    summary["wall"] = time.monotonic() - t0
    assert "10.203.0.13" in known.read_text()  # recorded on purpose
    try:
        yield hf, summary
    finally:
        cli("down", str(hf), state=state_dir)
        wait_no_ray(three_hosts, list(three_hosts.hosts), timeout=10)


def test_up_started_all_three(cluster3, three_hosts: HostEmulator) -> None:
    hf, summary = cluster3
    assert sorted(summary["started"]) == ["10.203.0.11", "10.203.0.12", "10.203.0.13"]
    assert summary["address"] == "10.203.0.11:6379"
    for ip, info in summary["hosts"].items():
        assert info["iface"] == "eth0"  # the interface that reaches the head -> NCCL/GLOO_SOCKET_IFNAME
        assert info["versions"]["ray"] == "2.58.0"
    for i in (1, 2, 3):
        assert ray_running(three_hosts, i) == RAY_PROCS if i == 1 else "raylet" in ray_running(three_hosts, i)


def test_status_shows_nodes_gpus_dashboard(cluster3, state_dir: Path) -> None:
    r = cli("status", "--json", state=state_dir)  # no hostfile: the one `up` recorded
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["healthy"] and st["gpus_total"] == 6
    assert {n["host"] for n in st["nodes"] if n["alive"]} == {"10.203.0.11", "10.203.0.12", "10.203.0.13"}
    assert st["dashboard"] == "http://10.203.0.11:8265"
    r = cli("status", state=state_dir)
    assert "healthy" in r.stdout and "http://10.203.0.11:8265" in r.stdout


def test_node_env_reaches_workers(cluster3, state_dir: Path) -> None:
    hf, _ = cluster3
    r = cli("exec", str(hf), "--", "cat /proc/$(pgrep -x raylet)/environ | tr '\\0' '\\n' | grep -E "
            "'^(NCCL_SOCKET_IFNAME|GLOO_SOCKET_IFNAME|VLLM_HOST_IP)=' | sort", state=state_dir)
    assert r.returncode == 0, r.stderr
    for i in (1, 2, 3):
        ip = f"10.203.0.1{i}"
        assert f"[{ip}] NCCL_SOCKET_IFNAME=eth0" in r.stdout
        assert f"[{ip}] GLOO_SOCKET_IFNAME=eth0" in r.stdout
        assert f"[{ip}] VLLM_HOST_IP={ip}" in r.stdout


PLACEMENT_PROBE = r"""
import json, sys
args = json.loads(sys.argv[1])
import ray
from ray import serve
from ray.util.placement_group import get_current_placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
ray.init(address=args["address"], _node_ip_address=args["node_ip"], log_to_driver=False)

from ray.serve.llm import LLMConfig
from ray.llm._internal.serve.core.server.llm_server import LLMServer
from cluster.serving.placement import replica_placement

# The deployment options ray.serve.llm derives from our placement_group_config.
cfg = LLMConfig(model_loading_config={"model_id": "placement-probe", "model_source": "/nonexistent"},
                engine_kwargs={"tensor_parallel_size": 2, "pipeline_parallel_size": 2},
                placement_group_config=replica_placement(2, cpus_per_worker=0.5),
                deployment_config={"ray_actor_options": {"num_cpus": 0.5}})
opts = LLMServer.get_deployment_options(cfg)

@ray.remote(num_cpus=0)
class Worker:  # stands in for vLLM's RayWorkerWrapper: one actor per GPU bundle, like its Ray executor
    def where(self):
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

@serve.deployment(name="replica")
class Replica:
    def __init__(self):
        pg = get_current_placement_group()
        table = placement_group_table(pg)
        workers = []
        for i, b in enumerate(pg.bundle_specs):
            if b.get("GPU"):
                w = Worker.options(num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=i,
                    placement_group_capture_child_tasks=True)).remote()
                workers.append((i, w))
        self.report = {"bundles": pg.bundle_specs, "strategy": table["strategy"],
                       "bundle_nodes": {int(k): v for k, v in table["bundles_to_node_id"].items()},
                       "driver_node": ray.get_runtime_context().get_node_id(),
                       "workers": [{"bundle": i, **ray.get(w.where.remote())} for i, w in workers]}
    def __call__(self):
        return self.report

app = Replica.options(placement_group_bundles=opts["placement_group_bundles"],
                      placement_group_strategy=opts["placement_group_strategy"],
                      ray_actor_options={"num_cpus": 0}).bind()
handle = serve.run(app, name="placement-probe", route_prefix=None)
report = handle.remote().result(timeout_s=120)
report["nodes"] = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
report["deployment_options"] = {k: opts[k] for k in ("placement_group_bundles", "placement_group_strategy")}
print("RESULT " + json.dumps(report))
"""


def test_tp2_pp2_placement_one_stage_per_node(cluster3, state_dir: Path) -> None:
    hf, _ = cluster3
    config = load_hostfile(hf)
    with RayCluster(config) as rc:
        args = json.dumps({"address": rc.address, "node_ip": rc.head.ray_ip})
        # in_node: with the node's env file, so the probe's ray.init presents the cluster's token
        res = rc.pool.run(rc.head, rc.node.in_node(f"{config.settings.ray.python} - '{args}'"), stdin=PLACEMENT_PROBE,
                          timeout=600)
        assert res.ok, res.stderr[-3000:]
        report = json.loads(next(l for l in res.stdout.splitlines() if l.startswith("RESULT "))[7:])
        status = cluster_status(rc)
    opts = report["deployment_options"]
    assert opts["placement_group_strategy"] == "PACK"
    assert [b.get("GPU", 0) for b in opts["placement_group_bundles"]] == [1, 1, 1, 1]
    bundle_nodes = {int(k): v for k, v in report["bundle_nodes"].items()}
    # where each bundle landed, and where each worker actually runs: the same node
    for w in report["workers"]:
        assert w["node_id"] == bundle_nodes[w["bundle"]]
        assert len(w["gpu_ids"]) == 1
    stages = check_stage_locality(report["bundles"], bundle_nodes, 2, 2, driver_node=report["driver_node"])
    stage_ips = [report["nodes"][next(iter(s))] for s in stages]
    assert len(set(stage_ips)) == 2, f"stages should span 2 hosts (2 GPU slots each): {stage_ips}"
    # Serve sees the app (status lists it)
    assert status["serve"]["placement-probe"]["status"] == "RUNNING"
    r = cli("status", str(hf), state=state_dir)
    assert "serve app placement-probe: RUNNING" in r.stdout


def test_rerun_changes_nothing_and_added_host_joins(cluster3, three_hosts: HostEmulator, state_dir: Path,
                                                    tmp_path: Path) -> None:
    hf, _ = cluster3
    before = {i: ray_pids(three_hosts, i) for i in (1, 2, 3)}
    r = cli("up", str(hf), "--json", state=state_dir)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["started"] == []
    assert {i: ray_pids(three_hosts, i) for i in (1, 2, 3)} == before

    three_hosts.add_host(4)
    config = load_hostfile(hf)
    hf4 = tmp_path / "hostfile4"
    hf4.write_text(hf.read_text().replace("10.203.0.13 slots=2 type=EMU\n", "10.203.0.13 slots=2 type=EMU\n"
                                          "10.203.0.14 slots=2 type=EMU\n"))
    # host 4's key is in the emulator's known_hosts, not in this cluster's: trust it on purpose
    r = cli("up", str(hf4), "--trust-new-host-keys", "--json", state=state_dir)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["started"] == ["10.203.0.14"]
    assert {i: ray_pids(three_hosts, i) for i in (1, 2, 3)} == before  # others untouched
    assert "raylet" in ray_running(three_hosts, 4)
    with RayCluster(load_hostfile(hf4)) as rc:
        st = rc.status()
    assert st["healthy"] and st["gpus_total"] == 8 and len(config.hosts) == 3

    r = cli("down", str(hf4), state=state_dir)
    assert r.returncode == 0, r.stderr
    assert "cluster down (4 host(s))" in r.stdout
    wait_no_ray(three_hosts, [1, 2, 3, 4])
    r = cli("status", str(hf4), state=state_dir)
    assert r.returncode != 0 and "cannot query Ray on the head" in r.stderr
