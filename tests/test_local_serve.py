"""README's first command: `fleetserve serve deployments/tiny.yaml` on a machine with no Ray running.

What a new user watching the terminal needs: one line saying the endpoint is
ready and where; `fleetserve status` showing the local cluster and the app
without a hostfile; and stopping it (here SIGTERM, as a closed terminal or
`kill` sends; Ctrl-C takes the same path) tears the app down and stops the
Ray head it started -- every process of it, nothing left listening.
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
FLEETSERVE = Path(sys.executable).parent / "fleetserve"
BASE = "http://127.0.0.1:8000"


def test_serve_reports_ready_shows_in_status_and_stops_its_head(tiny_model, tmp_path) -> None:
    env = {**os.environ, "FLEETSERVE_TINY_MODEL": str(tiny_model), "FLEETSERVE_STATE_DIR": str(tmp_path),
           "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(FLEETSERVE), "serve", str(ROOT / "deployments/tiny.yaml")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    head_session = None
    try:
        wait_for(lambda: any(line.startswith("ready: ") for line in lines) or proc.poll() is not None, 600,
                 "the ready line", state=lambda: "".join(lines[-20:]))
        assert proc.poll() is None, "".join(lines[-40:])
        ready = next(line for line in lines if line.startswith("ready: "))
        assert f"{BASE}/v1" in ready, ready

        chat = httpx.post(f"{BASE}/v1/chat/completions", timeout=REQUEST_TIMEOUT_S, json={
            "model": "tiny-qwen2.5-vl", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
        assert chat.status_code == 200, chat.text

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
