"""GPU tests (``pytest -m gpu``): deployments/qwen25_vl.yaml served on the GPUs of this machine.

On a machine with CUDA GPUs and a CUDA build of vLLM (the staged bundle:
``source benchmarks/gpu/run_served.sh --env-only``, see benchmarks/gpu/README.md):

1. the deployment file comes up the way an operator serves it -- ``fleetserve
   serve FILE --set ...`` (a local Ray head, the file resolved in this shell,
   ``serve run``) -- with a Qwen2.5-VL-7B-architecture model made by
   ``fleetserve make-model`` (dummy weights), TP = the visible GPUs up to 2,
   FlagGems on;
2. a text chat and an image chat answer;
3. ``/health`` carries the FlagGems report of every process of the replica
   (the replica, the engine core, each TP worker), all active, none failed;
4. the serving overhead against plain ``vllm serve`` with the same engine flags
   (benchmarks/gpu/serve_vs_plain.py, client ``vllm bench serve``) is recorded as
   JSON in ``$FLEETSERVE_GPU_RESULTS`` (default: a pytest tmp dir). A record,
   not a timed assert: the test fails only if a side does not come up or a load fails.

Skipped, with the reason, where there is no CUDA GPU or vLLM is not a CUDA build.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from waiting import stop_like_ctrl_c, wait_for

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[1]
FILE = ROOT / "deployments" / "qwen25_vl.yaml"
PORT = 9010  # the file's http_options.port
BASE = f"http://127.0.0.1:{PORT}"
SERVED = "Qwen2.5-VL-7B-Instruct"
#: Loads of the overhead record (serve_vs_plain.py names): text at c=1 and c=16, images at c=16.
OVERHEAD_LOADS = "random_c1,random_c16,random-mm_c16"


def gpu_skip_reason() -> str | None:
    """Why these tests cannot run here (None: they can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible (torch.cuda.is_available() is False)"
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return "vLLM is not installed"
    if not current_platform.is_cuda():
        return f"vLLM is not a CUDA build (platform: {type(current_platform).__name__})"
    return None


@pytest.fixture(scope="module")
def gpus() -> int:
    """The GPUs the tests use: those visible, up to 2 (skips the module where there are none)."""
    why = gpu_skip_reason()
    if why:
        pytest.skip(f"GPU tests need a CUDA GPU and vLLM's CUDA build: {why}")
    import torch

    return min(torch.cuda.device_count(), 2)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = Path(os.environ.get("FLEETSERVE_GPU_RESULTS") or tmp_path_factory.mktemp("gpu-results"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def model_dir(gpus: int, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2.5-VL-7B's config + tokenizer, no weights (``load_format=dummy``), made by ``fleetserve make-model``."""
    out = Path(os.environ.get("FLEETSERVE_TEST_MODELS", tmp_path_factory.mktemp("models"))) / "qwen2_5_vl_7b"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "cluster.cli", "make-model", "--arch", "qwen2_5_vl", "--size", "7b",
                        "--out", str(out)], check=True, cwd=ROOT, timeout=600)
    return out


@pytest.fixture(scope="module")
def api_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The key the endpoint requires (the file listens beyond loopback) and its keys file."""
    key = secrets.token_urlsafe(24)
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key, path


def overrides(model_dir: Path, gpus: int, *extra: str) -> list[str]:
    sets = [f"model.source={model_dir}", f"model.served_name={SERVED}", "model.load_format=dummy",
            f"tensor_parallel_size={gpus}", "accelerator_type=null", *extra]
    return [arg for s in sets for arg in ("--set", s)]


def serve_env(key_file: Path, key: str) -> dict[str, str]:
    """This machine's environment plus the key; no RAY_ADDRESS and an empty state dir, so ``fleetserve
    serve`` starts its own Ray head here rather than using a cluster recorded by ``fleetserve up``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "FLEETSERVE_API_KEYS_FILE": str(key_file), "OPENAI_API_KEY": key,
            "FLEETSERVE_STATE_DIR": str(key_file.parent / "state"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="class")
def endpoint(gpus: int, model_dir: Path, api_key: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """``fleetserve serve deployments/qwen25_vl.yaml --set ...`` with FlagGems on, until /health says 200."""
    key, key_file = api_key
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", str(FILE), "--ready-timeout", "1500",
             *overrides(model_dir, gpus, "flaggems.enabled=true")],
            cwd=ROOT, env=serve_env(key_file, key), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def up() -> bool:
                assert proc.poll() is None, f"fleetserve serve exited {proc.returncode}: " \
                                            f"{log_path.read_text()[-4000:]}"
                return httpx.get(f"{BASE}/health", timeout=10).status_code == 200

            wait_for(up, 1500, "the deployment answering /health 200", poll=5,
                     state=lambda: log_path.read_text()[-2000:])
            yield {"key": key, "headers": {"Authorization": f"Bearer {key}"}, "tp": gpus}
        finally:
            stop_like_ctrl_c(proc, grace_s=180)


def chat(ep: dict, content: object) -> httpx.Response:
    return httpx.post(f"{BASE}/v1/chat/completions", headers=ep["headers"], timeout=300, json={
        "model": SERVED, "max_tokens": 16, "messages": [{"role": "user", "content": content}]})


def png_data_url(size: int = 224) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class TestServedOnGpus:
    def test_text_chat(self, endpoint: dict) -> None:
        r = chat(endpoint, "Say hello in one word.")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == SERVED and body["usage"]["completion_tokens"] > 0

    def test_image_chat(self, endpoint: dict) -> None:
        r = chat(endpoint, [{"type": "text", "text": "What colour is this?"},
                            {"type": "image_url", "image_url": {"url": png_data_url()}}])
        assert r.status_code == 200, r.text
        # The image's tokens were in the prompt: far more than the text alone.
        assert r.json()["usage"]["prompt_tokens"] > 64, r.json()["usage"]

    def test_flaggems_report_from_every_worker(self, endpoint: dict) -> None:
        health = httpx.get(f"{BASE}/health", timeout=10).json()
        gems = health["models"][SERVED]["flaggems"]
        processes = gems["processes"]
        # The replica, the engine core and one worker per TP rank (with TP=1 the worker may be the core).
        assert len(processes) >= 1 + endpoint["tp"], [p.get("process") for p in processes]
        assert gems["summary"]["status"] == "active" and gems["summary"]["failed"] == [], gems["summary"]
        assert gems["summary"]["triton_ops"], gems["summary"]
        for rep in processes:
            assert rep["status"] == "active", rep
            patched = {op for op, res in rep["ops"].items() if res.get("status") == "patched"}
            assert patched == set(gems["summary"]["triton_ops"]), (rep.get("process"), rep["ops"])


def test_overhead_vs_plain_vllm_recorded(gpus: int, model_dir: Path, api_key: tuple[str, Path],
                                         results_dir: Path) -> None:
    """serve_vs_plain.py, both phases back to back on these GPUs (FlagGems off on both), then its report."""
    key, key_file = api_key
    script = ROOT / "benchmarks" / "gpu" / "serve_vs_plain.py"
    sets = overrides(model_dir, gpus)
    env = serve_env(key_file, key)
    for phase in ("serve", "plain"):
        r = subprocess.run([sys.executable, str(script), "run", "--phase", phase, "--model-dir", str(model_dir),
                            "--out", str(results_dir / f"{phase}.json"), "--deadline-s", "1500",
                            "--loads", OVERHEAD_LOADS, *sets],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        result = json.loads((results_dir / f"{phase}.json").read_text())
        assert result.get("ready_s") is not None, (result.get("error"), r.stdout[-3000:], r.stderr[-3000:])
        failed = [ld for ld in result["loads"] if "error" in ld or ld.get("failed")]
        assert not failed, failed
    name = f"serve_vs_plain_qwen25vl7b_tp{gpus}"
    r = subprocess.run([sys.executable, str(script), "report", str(results_dir / "serve.json"),
                        str(results_dir / "plain.json"), "--name", name, "--results-dir", str(results_dir)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((results_dir / f"{name}.json").read_text())
    assert out["commit"] and out["device"] and out["rows"]
    assert all(row.get("ratio") for row in out["rows"]), out["rows"]
    print(f"\noverhead vs plain vLLM ({out['device']}): " +
          ", ".join(f"{row['load']} {row['ratio']:.1%}" for row in out["rows"]) + f"; JSON: {results_dir / name}.json")
