"""The operator's path: `fleetserve up`, then serving a file from a separate shell on another machine.

Found this way on GPUs: a variable set in the shell that ran `serve run` never
reached the app (Serve builds it inside the cluster), so the file's default
model was served, and a replica that could not start was restarted forever
while `/v1/models` said 200. Here, on emulated hosts (real sshd, `fleetserve
up`), the client is this machine -- outside the cluster, on the bridge -- and
every override is set only in the client command's environment:

1. `fleetserve serve FILE --detach` with `${VAR}`s set in the client's env and a
   `--set`: what the replica itself reports (model directory, served name,
   Serve's admission limit) is what the client asked for.
2. plain `serve deploy` of the same unresolved file: Serve builds it in the
   cluster, where the variable is not set -> the app fails at once, with the
   variable and the fix named, instead of serving the default.
3. a replica whose model directory does not exist on its host: the deployment
   ends DEPLOY_FAILED after `startup_attempts`, and `fleetserve status`,
   `/health` and `serve status` all give the reason; `fleetserve serve` exits
   non-zero with it.

`/health` is timed in every state passed through (starting, healthy, failed).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from hosts.emulation import HostEmulator  # noqa: E402
from hosts.fixtures import FLEETSERVE, cli  # noqa: E402
from waiting import REQUEST_TIMEOUT_S, wait_for  # noqa: E402
from tinyqwen2 import tiny_args, tiny_qwen2  # noqa: E402

from cluster.serving.status import fetch_serve_details  # noqa: E402

pytestmark = [pytest.mark.hosts, pytest.mark.slow, pytest.mark.timeout(1200)]

BIN = Path(sys.executable).parent
HEAD = "10.203.0.11"
DASHBOARD = f"http://{HEAD}:8265"
BASE = f"http://{HEAD}:8000"
APP = "op"
HEALTH_SAMPLES: dict[str, list[float]] = {}


@pytest.fixture(scope="module")
def cluster(host_emulator: HostEmulator, tmp_path_factory: pytest.TempPathFactory):
    """h1 (head: controller, proxy, ingress) + h2 (room for one replica), brought up by `fleetserve up`."""
    work = tmp_path_factory.mktemp("operator")
    state = work / "state"
    host_emulator.add_host(1)
    host_emulator.add_host(2)
    hostfile = host_emulator.hostfile([1, 2], slots=1, path=work / "hostfile", settings={"ray.num_cpus": "2"},
                                      host_keys={1: "cpus=1"})
    r = cli("up", str(hostfile), state=state)
    assert r.returncode == 0, r.stdout + r.stderr
    # This test's own reads of the dashboard (and plain `serve deploy`/`serve status`) present the
    # cluster's token as an operator would; `fleetserve serve` is run without it and finds it itself.
    r = cli("token", str(hostfile), "--path", state=state)
    assert r.returncode == 0, r.stdout + r.stderr
    # Set for this module only: later modules start Ray heads of their own in this process.
    with pytest.MonkeyPatch.context() as token_env:
        token_env.setenv("RAY_AUTH_MODE", "token")
        token_env.setenv("RAY_AUTH_TOKEN_PATH", r.stdout.strip())
        try:
            yield {"work": work, "state": state, "hostfile": hostfile}
        finally:
            cli("down", str(hostfile), state=state)


def templated_file(work: Path) -> Path:
    """A deployment file whose model, name and switch come from ${VAR}s with defaults that would be wrong."""
    args = tiny_args(tiny_qwen2(), "unused", replica_cpus=1.0, cpus_per_worker=1.0)
    args["model"] = {"source": "${OP_MODEL_DIR:-/nfs/not-this-model}", "served_name": "${OP_NAME:-default-name}"}
    args["replicas"] = {"num_replicas": 1, "health_check_period_s": 2, "startup_attempts": 2}
    args["endpoint"] = {"allow_unauthenticated": True}  # the bridge is the test's own; keys are tested elsewhere
    path = work / "op.yaml"
    path.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [{"name": APP, "route_prefix": "/", "import_path": "cluster.serving.app:build_app",
                          "args": args}],
    }, sort_keys=False))
    return path


def shell_env(state: Path, **env: str) -> dict[str, str]:
    """A separate shell's environment: this one's plus ``env``, without the Ray token settings
    (``fleetserve`` must find the token of the cluster it brought up by itself)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    return {**base, "FLEETSERVE_STATE_DIR": str(state), "COLUMNS": "200", **env}


def client(*args: str, state: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """A command from a separate shell that has the operator's token settings plus ``env``."""
    full = {**os.environ, "FLEETSERVE_STATE_DIR": str(state), "COLUMNS": "200", **env}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=full)


def health(state_name: str | None = None) -> httpx.Response:
    """GET /health; timed per state when the answer is the ingress's (before routing, Serve's proxy answers)."""
    r = httpx.get(f"{BASE}/health", timeout=10)
    if r.headers.get("content-type", "").startswith("application/json"):
        body = r.json()
        seen = state_name or ",".join(sorted({m["state"] for m in body["models"].values()}))
        HEALTH_SAMPLES.setdefault(seen, []).append(r.elapsed.total_seconds())
    return r


def app_status() -> dict:
    return fetch_serve_details(DASHBOARD)["applications"].get(APP) or {}


def test_1_overrides_from_the_client_shell_reach_the_replica(cluster) -> None:
    model = tiny_qwen2()
    path = templated_file(cluster["work"])
    env = {"OP_MODEL_DIR": str(model), "OP_NAME": "op-tiny"}
    proc = subprocess.Popen(
        [str(FLEETSERVE), "serve", str(path), "--detach", "--set", "replicas.max_ongoing_requests=5",
         "--ready-timeout", "900"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=shell_env(cluster["state"], **env))
    try:
        # While the engine starts, /health answers at once and says so.
        wait_for(lambda: app_status().get("status") in ("DEPLOYING", "RUNNING"), 300, "app deploying",
                 state=lambda: str(app_status().get("status")))
        # Until Serve's proxy routes to the ingress, Serve answers (or holds) /health itself.
        wait_for(_ingress_answers, 300, "the ingress answering /health")
        while proc.poll() is None:
            health()
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert proc.returncode == 0, out
    assert "ready" in out and f"{HEAD}:8000/v1" in out, out

    # The replica's own report (where it runs, what it loaded) follows its first RUNNING state.
    wait_for(lambda: "model_source" in health().json()["models"]["op-tiny"], 60, "the replica's report",
             state=lambda: health().text[:500])
    body = health().json()
    report = body["models"]["op-tiny"]
    assert report["state"] == "healthy" and report["model_source"] == str(model), body
    models = httpx.get(f"{BASE}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["op-tiny"]
    assert models[0]["metadata"]["fleetserve"]["running_replicas"] == 1
    deployments = app_status()["deployments"]
    cfg = deployments["FleetLLMServer:op-tiny"]["deployment_config"]
    assert cfg["max_ongoing_requests"] == 5
    chat = httpx.post(f"{BASE}/v1/chat/completions", timeout=REQUEST_TIMEOUT_S, json={
        "model": "op-tiny", "messages": [{"role": "user", "content": "the word"}], "max_tokens": 4})
    assert chat.status_code == 200, chat.text


def _ingress_answers() -> bool:
    try:
        r = httpx.get(f"{BASE}/health", timeout=5)
    except httpx.HTTPError:
        return False
    return r.headers.get("content-type", "").startswith("application/json") and "models" in r.json()


def test_2_plain_serve_deploy_of_a_templated_file_fails_clearly(cluster) -> None:
    path = templated_file(cluster["work"])
    # The variable is set in the shell running `serve deploy`, as in the GPU report; Serve cannot see it.
    r = client(str(BIN / "serve"), "deploy", str(path), "--address", DASHBOARD, state=cluster["state"],
               env={"OP_MODEL_DIR": str(tiny_qwen2()), "OP_NAME": "op-tiny"}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: app_status().get("status") == "DEPLOY_FAILED", 120, "the build fails",
             state=lambda: str(app_status().get("status")))
    message = app_status()["message"]
    assert "OP_MODEL_DIR" in message and "fleetserve serve" in message, message
    # The default appears only in the config as written (the ${...} text), never as a value in use.
    details = fetch_serve_details(DASHBOARD)
    assert "FleetLLMServer:default-name" not in (details["applications"][APP].get("deployments") or {})
    in_use = str(details).replace("${OP_MODEL_DIR:-/nfs/not-this-model}", "")
    assert "/nfs/not-this-model" not in in_use, "the default must not be deployed"


def test_3_a_replica_that_cannot_start_fails_the_deployment_with_its_reason(cluster) -> None:
    path = templated_file(cluster["work"])
    missing = "/srv/models/not-on-any-host"
    t0 = time.monotonic()
    r = subprocess.run([str(FLEETSERVE), "serve", str(path), "--detach", "--set", f"model.source={missing}",
                        "--set", "model.served_name=op-missing", "--ready-timeout", "600"],
                       capture_output=True, text=True, timeout=900, env=shell_env(cluster["state"]))
    failed_after = time.monotonic() - t0
    assert r.returncode != 0, r.stdout + r.stderr
    assert "not a directory" in r.stderr and missing in r.stderr, r.stdout + r.stderr

    dep = app_status()["deployments"]["FleetLLMServer:op-missing"]
    assert dep["status"] == "DEPLOY_FAILED" and missing in dep["message"], dep
    body = health("failed")
    assert body.status_code == 503
    model = body.json()["models"]["op-missing"]
    assert model["state"] == "failed" and missing in model["reason"] and "Traceback" not in model["reason"]
    st = cli("status", str(cluster["hostfile"]), state=cluster["state"], timeout=300)
    assert "DEPLOY_FAILED" in st.stdout and missing in st.stdout, st.stdout + st.stderr
    ss = client(str(BIN / "serve"), "status", "--address", DASHBOARD, state=cluster["state"], env={}, timeout=120)
    assert "DEPLOY_FAILED" in ss.stdout and missing in ss.stdout, ss.stdout + ss.stderr
    print(f"\nfailed deployment reported after {failed_after:.1f}s")


def test_4_health_answers_within_a_second_in_every_state() -> None:
    # Samples come from the steps above: starting, healthy and failed.
    assert {"starting", "healthy", "failed"} <= set(HEALTH_SAMPLES), HEALTH_SAMPLES.keys()
    for state, samples in HEALTH_SAMPLES.items():
        print(f"/health {state}: n={len(samples)} median={statistics.median(samples) * 1000:.0f} ms "
              f"max={max(samples) * 1000:.0f} ms")
        assert statistics.median(samples) < 1.0, (state, samples)


def test_5_an_app_that_fails_to_build_ends_fleetserve_serve_with_serves_reason(cluster) -> None:
    """No endpoint ever answers for an app whose build fails: the command reads Serve's verdict instead.

    Here the direct data path asked of a cluster brought up without HAProxy (the hostfile has no ``env.``).
    """
    path = templated_file(cluster["work"])
    r = subprocess.run([str(FLEETSERVE), "serve", str(path), "--detach", "--set", "data_path=direct",
                        "--ready-timeout", "600"], capture_output=True, text=True, timeout=900,
                       env=shell_env(cluster["state"], OP_MODEL_DIR=str(tiny_qwen2()), OP_NAME="op-direct"))
    assert r.returncode != 0, r.stdout + r.stderr
    assert "deployment failed: application op" in r.stderr and "HAProxy" in r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "within 600s" not in r.stderr, r.stderr
    app = app_status()
    assert app["status"] == "DEPLOY_FAILED" and "args.data_path" in app["message"], app
