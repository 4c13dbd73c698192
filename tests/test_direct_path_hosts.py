"""The direct data path the operator's way: `fleetserve up`, then `fleetserve serve --detach` from another shell.

h1 is the head (Serve's controller and HAProxy), h2 has room for the replica
only; the hostfile's ``env.`` gives every node's ``ray start`` the settings the
path needs (cluster/serving/haproxy.py ``CLUSTER_ENV``). The client is this
machine, outside the cluster on the bridge: it serves the file with
``--set data_path=direct``, then a streamed chat goes through h1's HAProxy to
the replica on h2, which answers HTTP itself with fleetserve's checks (401
without the key, its own /health).

Opt-in (marker ``soak``): one more engine start in the emulated-host stream,
the longer of CI's two. Run it with:
    bash scripts/test.sh -m soak tests/test_direct_path_hosts.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from hosts.emulation import HostEmulator  # noqa: E402
from hosts.fixtures import FLEETSERVE, cli  # noqa: E402
from test_operator_path import shell_env  # noqa: E402
from tinyqwen2 import tiny_args, tiny_qwen2  # noqa: E402
from waiting import REQUEST_TIMEOUT_S, wait_for  # noqa: E402

from cluster.serving.haproxy import CLUSTER_ENV  # noqa: E402
from cluster.serving.status import fetch_serve_details  # noqa: E402

pytestmark = [pytest.mark.hosts, pytest.mark.slow, pytest.mark.soak, pytest.mark.timeout(1500)]

HEAD, WORKER = "10.203.0.11", "10.203.0.12"
BASE = f"http://{HEAD}:8000"
DASHBOARD = f"http://{HEAD}:8265"
MODEL = "direct-tiny"
KEY = "direct-hosts-test-key"


def test_direct_path_on_a_cluster_brought_up_apart(host_emulator: HostEmulator, tmp_path: Path) -> None:
    host_emulator.add_host(1)
    host_emulator.add_host(2)
    state = tmp_path / "state"
    settings = {"ray.num_cpus": "2", **{f"env.{k}": v for k, v in CLUSTER_ENV.items()}}
    hostfile = host_emulator.hostfile([1, 2], slots=1, path=tmp_path / "hostfile", settings=settings,
                                      host_keys={1: "cpus=1"})
    r = cli("up", str(hostfile), state=state)
    assert r.returncode == 0, r.stdout + r.stderr
    # The keys file is read where Serve builds the app (h1): the hosts share this machine's home.
    keys = Path.home() / ".cache" / "fleetserve" / f"direct-hosts-test-{os.getpid()}.keys"
    keys.parent.mkdir(parents=True, exist_ok=True)
    keys.write_text(KEY + "\n")
    keys.chmod(0o600)
    args = tiny_args(tiny_qwen2(), MODEL, replica_cpus=1.0, cpus_per_worker=1.0)
    args["endpoint"] = {"api_keys_file": str(keys)}
    path = tmp_path / "direct.yaml"
    path.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly", "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [{"name": "direct", "route_prefix": "/", "import_path": "cluster.serving.app:build_app",
                          "args": args}]}, sort_keys=False))
    try:
        served = subprocess.run([str(FLEETSERVE), "serve", str(path), "--detach", "--set", "data_path=direct",
                                 "--ready-timeout", "900"], capture_output=True, text=True, timeout=1000,
                                env=shell_env(state))
        assert served.returncode == 0, served.stdout + served.stderr
        assert f"{HEAD}:8000/v1" in served.stdout, served.stdout

        auth = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream("POST", f"{BASE}/v1/chat/completions", headers=auth, timeout=REQUEST_TIMEOUT_S, json={
                "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
                "stream": True}) as resp:
            assert resp.status_code == 200, resp.read()
            chunks = [line for line in resp.iter_lines() if line.startswith("data: ")]
        assert chunks[-1] == "data: [DONE]" and json.loads(chunks[0][6:])["object"] == "chat.completion.chunk"

        denied = httpx.post(f"{BASE}/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
        assert denied.status_code == 401, denied.text

        health = httpx.get(f"{BASE}/health", timeout=5)
        assert health.status_code == 200, health.text
        model = health.json()["models"][MODEL]
        assert model["state"] == "healthy" and model["data_path"] == "direct", model

        # The replica (the endpoint itself) runs on h2, the head only routes to it.
        token = cli("token", str(hostfile), "--path", state=state).stdout.strip()
        with pytest.MonkeyPatch.context() as env:
            env.setenv("RAY_AUTH_MODE", "token")
            env.setenv("RAY_AUTH_TOKEN_PATH", token)
            deps = fetch_serve_details(DASHBOARD)["applications"]["direct"]["deployments"]
        replicas = [r for d in deps.values() for r in d["replicas"] if "LLMServer" in r.get("actor_name", "")]
        assert [r["node_ip"] for r in replicas] == [WORKER], replicas
    finally:
        keys.unlink(missing_ok=True)
        cli("down", str(hostfile), state=state)
    wait_for(lambda: not _answers(), 60, "nothing answering on the head's port after down")


def _answers() -> bool:
    try:
        httpx.get(f"{BASE}/health", timeout=3)
    except httpx.HTTPError:
        return False
    return True
