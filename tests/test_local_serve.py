"""`fleetserve serve deployments/tiny.yaml` from a shell, on a machine with no Ray running.

What a new user watching the terminal needs: one line saying the endpoint is
ready and where; `fleetserve status` showing the local cluster and the app
without a hostfile; and stopping it (here SIGTERM, as a closed terminal or
`kill` sends; Ctrl-C takes the same path) tears the app down and stops the
Ray head it started -- every process of it, nothing left listening.

It runs on the ``direct`` data path (``--set data_path=direct``), the one with
more parts to get right from a shell: the local head must get the cluster
settings that path needs (Ray Serve's HAProxy in front), the vLLM replica
serves HTTP itself, and fleetserve's checks run in it: a streamed chat with the
key, 401 without it, the replica's own /health, an image URL to an internal
address refused. What the default (ingress) path changes here is only the
head's environment (none of those settings; the unit test
``test_a_local_head_gets_the_paths_cluster_settings_only_for_a_direct_app``);
that path is served from a separate shell onto a cluster `fleetserve up` brought
up (tests/test_operator_path.py, as root) and in-process by the rest
(tests/test_serving.py, tests/test_endpoint_security.py). README's first
command as written is tried by hand before each landing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from waiting import REQUEST_TIMEOUT_S, wait_for  # noqa: E402

from cluster.commands.serve_launch import session_pids  # noqa: E402

# Up to 600 s to the ready line and REQUEST_TIMEOUT_S for the first answer, before pytest-timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[1]
FLEETSERVE = Path(sys.executable).parent / "fleetserve"
BASE = "http://127.0.0.1:8000"
MODEL = "tiny-qwen2.5-vl"


def test_serve_reports_ready_serves_directly_shows_in_status_and_stops_its_head(tiny_model, tmp_path) -> None:
    key = "local-serve-test-key"
    keys = tmp_path / "api-keys"
    keys.write_text(key + "\n")
    keys.chmod(0o600)
    env = {**os.environ, "FLEETSERVE_TINY_MODEL": str(tiny_model), "FLEETSERVE_STATE_DIR": str(tmp_path),
           "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(FLEETSERVE), "serve", str(ROOT / "deployments/tiny.yaml"), "--set", "data_path=direct",
                             "--set", f"endpoint.api_keys_file={keys}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    auth = {"Authorization": f"Bearer {key}"}
    head_session = None
    try:
        wait_for(lambda: any(line.startswith("ready: ") for line in lines) or proc.poll() is not None, 600,
                 "the ready line", state=lambda: "".join(lines[-20:]))
        assert proc.poll() is None, "".join(lines[-40:])
        ready = next(line for line in lines if line.startswith("ready: "))
        assert f"{BASE}/v1" in ready, ready

        chunks = []
        with httpx.stream("POST", f"{BASE}/v1/chat/completions", headers=auth, timeout=REQUEST_TIMEOUT_S, json={
                "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
                "stream": True}) as r:
            assert r.status_code == 200, r.read()
            chunks = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert chunks[-1] == "data: [DONE]" and len(chunks) >= 3, chunks
        # vLLM's own chunks, straight from the replica (no ingress re-framing).
        assert json.loads(chunks[0][6:])["object"] == "chat.completion.chunk"

        denied = httpx.post(f"{BASE}/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
        assert denied.status_code == 401 and denied.json()["type"] == "AuthenticationError"

        health = httpx.get(f"{BASE}/health", timeout=5)
        assert health.status_code == 200, health.text
        model = health.json()["models"][MODEL]
        assert model["state"] == "healthy" and model["data_path"] == "direct", model
        assert model["flaggems"]["summary"]["status"] == "none"

        internal = httpx.post(f"{BASE}/v1/chat/completions", headers=auth, timeout=30, json={
            "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://127.0.0.1:8000/health"}},
                {"type": "text", "text": "what is this?"}]}]})
        assert internal.status_code == 400 and "public address" in internal.json()["message"], internal.text

        models = httpx.get(f"{BASE}/v1/models", headers=auth, timeout=10)
        assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == [MODEL]

        st = subprocess.run([str(FLEETSERVE), "status"], env=env, capture_output=True, text=True, timeout=120)
        assert st.returncode == 0 and "alive" in st.stdout and "FleetLLMServer" in st.stdout, st.stdout + st.stderr
        head_session = json.loads((tmp_path / "local-head.json").read_text())["pid"]
        assert session_pids(head_session), "the head's processes run in their own session"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    assert proc.returncode is not None
    if head_session is not None:
        assert session_pids(head_session) == [], "every process of the local head is gone"
    assert not (tmp_path / "local-head.json").exists()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{BASE}/health", timeout=5)
