"""Scale-out, scale-down, drain and a lost host on emulated hosts, under real load.

Real sshd hosts (network + PID namespaces, see tests/hosts), brought up with
``fleetserve up``; the app is deployed the way an operator does it, ``serve
deploy`` against the head's dashboard; load comes from the real ``openai``
client. Each worker host offers 2 logical CPUs and one replica needs 2 (replica
actor + its vLLM worker bundle), so a replica fits on an empty worker host and
never on the head (``cpus=1`` in the hostfile; Serve's ingress takes 0.1 there):
where each replica lands is determined by the hosts there are, as on a GPU fleet
where a TP group fills a host. The steps run in order against one cluster:

1. h1 (head) + h2 are up, one replica on h2; under load Serve wants a second
   replica and has nowhere to put it; h3 is added to the hostfile and
   ``fleetserve up`` brings it in -> the second replica lands on h3. Measured:
   seconds from ``up`` to h3's first served request.
2. the raylet of h3 is killed under load while h2 holds the other replica ->
   the ingress retries on h2 what h3 could not answer, no request fails;
   ``fleetserve up`` brings h3 back.
3. idle -> back to one replica.
4. ``fleetserve drain`` the host holding it, under load -> Serve moves the
   replica to the other worker (replacement first) and no request fails;
   ``fleetserve up`` brings the drained host back.
5. the raylet of the host holding the only replica is killed under load -> clients
   get 503 + Retry-After while no replica can take requests (never a hang), the
   replica is rebuilt on the remaining worker, and every request succeeds again.

Counts (sent, succeeded, retried, failed, timeouts) and timings are printed and
written to ``$FLEETSERVE_FLEET_REPORT`` (JSON) when set, which is how
``benchmarks/results/fleet_hosts_cpu.json`` was made.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from hosts.emulation import HostEmulator  # noqa: E402
from hosts.fixtures import cli  # noqa: E402
import waiting  # noqa: E402
from loadgen import CLIENT_TIMEOUT_S, Counts, Load, add, ingress_counters  # noqa: E402
from tinyqwen2 import tiny_args, tiny_qwen2  # noqa: E402
from waiting import wait_healthy  # noqa: E402

from cluster.serving.status import fetch_serve_details  # noqa: E402

pytestmark = [pytest.mark.hosts, pytest.mark.slow, pytest.mark.timeout(1500)]

BIN = Path(sys.executable).parent
HEAD = "10.203.0.11"
DASHBOARD = f"http://{HEAD}:8265"
BASE = f"http://{HEAD}:8000"
MODEL, APP = "tiny-text", "fleet"
DEPLOYMENT = f"FleetLLMServer:{MODEL}"
RAY_TMP = "/run/fleetserve-ray"
REPORT: dict[str, object] = {}
# Clients with think time. Busy-looping clients would keep the serving engine
# at 100% of the 2 shared cores and a starting replica would crawl; instead the
# autoscaling target is small. LIGHT (2 clients): well above the target of 0.2
# requests in flight -> two replicas; IDLE (1 client): well below -> one.
LIGHT_PAUSE_S, IDLE_PAUSE_S = 0.3, 3.0
STATE: dict[str, object] = {}


def ip(i: int) -> str:
    return f"10.203.0.1{i}"


def replicas() -> list[dict]:
    apps = fetch_serve_details(DASHBOARD)["applications"]
    deployments = (apps.get(APP) or {}).get("deployments") or {}  # empty while the app is still building
    return (deployments.get(DEPLOYMENT) or {}).get("replicas") or []


def deploy_failed() -> bool:
    app = fetch_serve_details(DASHBOARD)["applications"].get(APP) or {}
    if app.get("status") == "DEPLOY_FAILED":
        raise AssertionError(f"deploy failed: {app.get('message')}")
    return False


def running_on() -> list[str]:
    """Node IPs of the RUNNING replicas (sorted)."""
    return sorted(r["node_ip"] for r in replicas() if r["state"] == "RUNNING")


def wait_for(pred, timeout: float, what: str, poll: float = 1.0) -> float:
    return waiting.wait_for(pred, timeout, what, poll,
                            state=lambda: f"replicas: {[(r['node_ip'], r['state']) for r in replicas()]}")


def first_served_at(hostfile: Path, host_ip: str, state: Path) -> float | None:
    """Wall-clock time of the first request a replica on ``host_ip`` answered (its Serve access log)."""
    r = cli("exec", "--host", host_ip, str(hostfile), "--",
            f"cat {RAY_TMP}/session_latest/logs/serve/replica_{APP}_*.log 2>/dev/null | grep -m1 -E ' CALL (chat|completions) OK '",
            state=state, timeout=60)
    m = re.search(r"INFO (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", r.stdout)
    if not m:
        return None
    return dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def record(name: str, counts: Counts | None = None, **extra: object) -> None:
    REPORT[name] = {**(asdict(counts) if counts else {}), **extra}
    print(f"\n[{name}] {json.dumps(REPORT[name])}")
    path = os.environ.get("FLEETSERVE_FLEET_REPORT")
    if path:
        from provenance import provenance

        Path(path).write_text(json.dumps({**provenance(), **REPORT}, indent=1))


@pytest.fixture(scope="module")
def three_hosts(host_emulator: HostEmulator) -> HostEmulator:
    """fs-h1..3 with sshd; each worker host's vLLM engine gets its own core.

    vLLM's CPU backend pins a TP=1 engine to core 0 on every host it thinks it
    owns; emulated hosts share this machine's two cores, so a replica starting
    on h3 would share core 0 with h2's busy engine and crawl. The per-host env
    (sshd's SetEnv -> ``ray start`` -> every worker there) pins h2 to core 0 and
    h3 to core 1, as separate machines would be.
    """
    host_emulator.add_host(1)
    host_emulator.add_host(2, env={"VLLM_CPU_OMP_THREADS_BIND": "0"})
    host_emulator.add_host(3, env={"VLLM_CPU_OMP_THREADS_BIND": "1"})
    return host_emulator


@pytest.fixture(scope="module")
def fleet(three_hosts: HostEmulator, tmp_path_factory: pytest.TempPathFactory):
    """Ray on h1 + h2 (h3 has sshd only), the tiny app deployed with ``serve deploy``; down at the end."""
    work = tmp_path_factory.mktemp("fleet")
    state = work / "state"
    settings = {"ray.num_cpus": "2"}
    small_head = {1: "cpus=1"}  # Serve's controller and ingress, never a replica
    hf12 = three_hosts.hostfile([1, 2], slots=1, path=work / "hostfile12", settings=settings, host_keys=small_head)
    hf123 = three_hosts.hostfile([1, 2, 3], slots=1, path=work / "hostfile123", settings=settings,
                                 host_keys=small_head)
    r = cli("up", str(hf12), state=state)
    assert r.returncode == 0, r.stdout + r.stderr
    # The operator's side of token auth: `serve deploy` and the dashboard reads present the cluster's token.
    r = cli("token", str(hf12), "--path", state=state)
    assert r.returncode == 0, r.stderr
    # Set for this module only: later modules start Ray heads of their own in this process.
    token_env = pytest.MonkeyPatch()
    token_env.setenv("RAY_AUTH_MODE", "token")
    token_env.setenv("RAY_AUTH_TOKEN_PATH", r.stdout.strip())
    # downscale_delay_s: while a replica's engine starts, the 2 shared cores starve the ingress and
    # its load metrics reach Serve late; with 20 s Serve took that for idleness and stopped the
    # starting replica (seen: 526 s until the second replica ran).
    args = tiny_args(tiny_qwen2(), MODEL, replica_cpus=1.0, cpus_per_worker=1.0, replicas={
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 0.2,
                        "upscale_delay_s": 2, "downscale_delay_s": 60},
        "max_ongoing_requests": 4,
        "health_check_period_s": 2, "health_check_timeout_s": 10, "graceful_shutdown_timeout_s": 20,
    }, request_timeout_s=120, retry_attempts=2)
    # Listens on 0.0.0.0 inside the emulated hosts' network; the fault tests send no key.
    args["endpoint"] = {"allow_unauthenticated": True}
    config = work / "serve.yaml"
    config.write_text(yaml.safe_dump({
        # Clients use the head's proxy; worker hosts only run replicas.
        "proxy_location": "HeadOnly",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [{"name": APP, "route_prefix": "/", "import_path": "cluster.serving.app:build_app",
                          "args": args}],
    }, sort_keys=False))
    try:
        t0 = time.monotonic()
        d = subprocess.run([str(BIN / "serve"), "deploy", str(config), "--address", DASHBOARD],
                           capture_output=True, text=True, timeout=300)
        assert d.returncode == 0, d.stdout + d.stderr
        wait_for(lambda: not deploy_failed() and running_on() == [ip(2)], 900, "first replica on h2")
        wait_healthy(BASE, 300)
        print(f"\napp ready in {time.monotonic() - t0:.0f}s")
        yield {"hf12": hf12, "hf123": hf123, "state": state}
    finally:
        st = cli("status", str(hf123), state=state, timeout=300)
        print(st.stdout[-4000:], st.stderr[-2000:])
        # What each host's replicas said last: the first thing to read when a step failed.
        logs = cli("exec", str(hf123), "--", f"tail -n 15 {RAY_TMP}/session_latest/logs/serve/replica_*.log "
                   f"{RAY_TMP}/session_latest/logs/worker-*.err 2>/dev/null | tail -n 60", state=state, timeout=120)
        print(logs.stdout[-12000:])
        cli("down", str(hf123), state=state)
        token_env.undo()


def test_1_added_host_takes_the_next_replica_under_load(fleet, three_hosts: HostEmulator) -> None:
    hf123, state = fleet["hf123"], fleet["state"]
    with Load(BASE, MODEL, workers=2, max_tokens=24, pause_s=LIGHT_PAUSE_S) as load:
        # Serve wants a second replica and has no room for it: it waits, requests keep succeeding.
        wait_for(lambda: len(replicas()) == 2, 120, "Serve asks for a second replica")
        load.wait_served(3)  # requests keep flowing while the second replica has nowhere to go
        assert running_on() == [ip(2)]
        before = load.window()
        t_up = time.time()
        r = cli("up", str(hf123), "--json", state=state)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["started"] == [ip(3)]
        t_joined = time.time()
        wait_for(lambda: running_on() == [ip(2), ip(3)], 600, "second replica on the new host")
        t_running = time.time()
        served: list[float] = []  # filled by the poll: one SSH round-trip per try, none after

        def h3_served() -> bool:
            t = first_served_at(hf123, ip(3), state)
            if t is not None:
                served.append(t)
            return bool(served)

        wait_for(h3_served, 120, "h3 serves", poll=2)
        t_first = served[0]
        load.wait_served(3)
        after = load.window()
    total = add(before, after)
    record("scale_out", total, seconds_up_to_node_joined=round(t_joined - t_up, 1),
           seconds_up_to_replica_running=round(t_running - t_up, 1),
           seconds_up_to_first_request_served_there=round(t_first - t_up, 1))
    assert total.succeeded > 0 and total.failed == 0 and total.timeouts == 0
    assert total.max_latency_s < CLIENT_TIMEOUT_S


def test_2_lost_host_with_a_second_replica_fails_no_request(fleet, three_hosts: HostEmulator) -> None:
    """h3's raylet dies under load while h2 holds the other replica: the ingress retries what h3
    could not answer on h2, so clients see no failure; ``fleetserve up`` brings h3 back."""
    hf123, state = fleet["hf123"], fleet["state"]
    with Load(BASE, MODEL, workers=2, max_tokens=24, pause_s=LIGHT_PAUSE_S) as load:
        wait_for(lambda: running_on() == [ip(2), ip(3)], 60, "two replicas before the kill")
        load.wait_served(2)
        load.window()
        retried_before = ingress_counters(BASE)["retried"]
        three_hosts.hosts[3].kill("raylet")
        took = wait_for(lambda: ip(3) not in {r["node_ip"] for r in replicas() if r["state"] == "RUNNING"},
                        300, "Serve drops the lost replica")
        load.wait_served(4)  # requests served by h2 alone after the drop
        during = load.window()
        retried_by_ingress = ingress_counters(BASE)["retried"] - retried_before
        t_up = time.time()
        r = cli("up", str(hf123), "--json", state=state)
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["started"] == [ip(3)]
        seconds_up = time.time() - t_up
    record("host_killed_with_second_replica", during, host=ip(3), seconds_to_replica_dropped=round(took, 1),
           retried_by_ingress=retried_by_ingress, seconds_up_to_rejoin=round(seconds_up, 1))
    assert during.succeeded > 0 and during.failed == 0 and during.timeouts == 0, "no request failed"
    assert during.max_latency_s < CLIENT_TIMEOUT_S


def test_3_idle_replicas_scale_down(fleet) -> None:
    took = wait_for(lambda: len(replicas()) == 1 and len(running_on()) == 1, 300, "scale down when idle")
    STATE["replica_host"] = running_on()[0]
    record("scale_down", seconds_idle_to_one_replica=round(took, 1), replica_on=STATE["replica_host"])


def test_4_drain_moves_the_replica_without_failing_requests(fleet, three_hosts: HostEmulator) -> None:
    hf123, state = fleet["hf123"], fleet["state"]
    drained = str(STATE["replica_host"])
    other = ip(3) if drained == ip(2) else ip(2)
    with Load(BASE, MODEL, workers=1, max_tokens=24, pause_s=IDLE_PAUSE_S) as load:
        load.wait_served(1)
        t0 = time.time()
        r = cli("drain", drained, str(hf123), "--timeout", "600", state=state, timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
        seconds = time.time() - t0
        assert running_on() == [other]
        load.wait_served(1)  # at least one request answered after the move, by the other host
        counts = load.window()
    record("drain", counts, host=drained, seconds=round(seconds, 1), replica_now_on=other)
    # Every request in flight finished: nothing failed, nothing had to be retried by the client.
    assert counts.succeeded > 0 and counts.failed == 0 and counts.timeouts == 0 and counts.status_503 == 0
    index = int(drained[-1])
    assert "raylet" not in three_hosts.hosts[index].process_names()
    # The drained host comes back with `up`.
    r = cli("up", str(hf123), "--json", state=state)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["started"] == [drained]
    STATE["replica_host"] = other


def test_5_lost_host_costs_seconds_not_an_outage(fleet, three_hosts: HostEmulator) -> None:
    lost = str(STATE["replica_host"])
    spare = ip(3) if lost == ip(2) else ip(2)
    with Load(BASE, MODEL, workers=1, max_tokens=24, pause_s=IDLE_PAUSE_S) as load:
        load.wait_served(1)
        load.window()
        t_kill = time.time()
        three_hosts.hosts[int(lost[-1])].kill("raylet")
        took = wait_for(lambda: running_on() == [spare], 900, "replica rebuilt on the remaining worker")
        wait_healthy(BASE, 120)
        t_recovered = time.time()
        during = load.window()
        load.wait_served(3)
        after = load.window()
    events = [(round(t - t_kill, 2), s) for t, s in load.events if t >= t_kill]
    failed_at = [t for t, s in events if s != 200]
    record("host_killed", during, host=lost, rebuilt_on=spare, seconds_to_rebuilt_replica=round(took, 1),
           seconds_to_recovery=round(t_recovered - t_kill, 1),
           last_failure_after_kill_s=max(failed_at) if failed_at else None, after_recovery=asdict(after))
    assert during.succeeded > 0 or after.succeeded > 0
    assert during.timeouts == 0 and during.max_latency_s < CLIENT_TIMEOUT_S, "a request hung"
    # Failures are only 503s (no replica: Retry-After given) or answers cut mid-stream.
    assert during.status_503 == during.status_503_with_retry_after
    assert after.failed == 0 and after.timeouts == 0 and after.succeeded > 0, "every request succeeds again"
    st = cli("status", str(fleet["hf123"]), "--json", state=fleet["state"], timeout=300)
    summary = json.loads(st.stdout)
    # the lost host shows as not alive: dead (Ray still lists its node) or missing
    assert st.returncode == 2 and lost in summary["dead"] + summary["missing"], summary
    rows = {row["deployment"]: row for row in summary["serve_summary"]}
    assert rows[DEPLOYMENT]["states"].get("RUNNING") == 1 and rows[DEPLOYMENT]["nodes"] == {spare: 1}
