"""GPU tests (``pytest -m gpu``): deployments/qwen25_vl.yaml served on the GPUs of this machine.

On a machine with CUDA GPUs and a CUDA build of vLLM (the staged bundle:
``source benchmarks/gpu/run_served.sh --env-only``, see benchmarks/gpu/README.md):

1. the deployment file comes up the way an operator serves it -- ``fleetserve
   serve FILE --set ...`` (a local Ray head, the file resolved in this shell,
   ``serve run``) -- with a Qwen2.5-VL-7B-architecture model made by
   ``fleetserve make-model`` (dummy weights), in two layouts over the visible
   GPUs (up to 4): all in one TP group with FlagGems on, and two pipeline
   stages (TP=1 x PP=2 on 2 GPUs, TP=2 x PP=2 on 4) with FlagGems off;
2. a text chat and an image chat answer;
3. ``/health`` carries the FlagGems report of every process of the replica
   (the replica, the engine core, each worker), all active, none failed --
   and no report where FlagGems is off;
   deployments/minicpm_o_26.yaml (TP=1 as in the file, audio allowed through
   ``--set``) answers text, image and audio chats; each deployment's run is
   written to ``$FLEETSERVE_GPU_RESULTS/gpu_deployment_NAME.json``;
4. the serving overhead against plain ``vllm serve`` with the same engine flags
   (benchmarks/gpu/serve_vs_plain.py, client ``vllm bench serve``) is recorded as
   JSON in ``$FLEETSERVE_GPU_RESULTS`` (default: a pytest tmp dir). A record,
   not a timed assert: the test fails only if a side does not come up or a load fails.

Skipped, with the reason, where there is no CUDA GPU or vLLM is not a CUDA build.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import secrets
import struct
import subprocess
import sys
import time
import wave
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
    """The GPUs the tests use: of those visible, the most that is a power of two, up to 4 (Qwen2.5-VL-7B's
    28 attention and 4 KV heads divide by 1, 2, 4); skips the module where there are none."""
    why = gpu_skip_reason()
    if why:
        pytest.skip(f"GPU tests need a CUDA GPU and vLLM's CUDA build: {why}")
    import torch

    return next(n for n in (4, 2, 1) if n <= torch.cuda.device_count())


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = Path(os.environ.get("FLEETSERVE_GPU_RESULTS") or tmp_path_factory.mktemp("gpu-results"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_model_dir(arch: str, size: str, name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The architecture's config + tokenizer (+ remote code), no weights (``load_format=dummy``), made by
    ``fleetserve make-model``."""
    out = Path(os.environ.get("FLEETSERVE_TEST_MODELS", tmp_path_factory.mktemp("models"))) / name
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "cluster.cli", "make-model", "--arch", arch, "--size", size,
                        "--out", str(out)], check=True, cwd=ROOT, timeout=600)
    return out


@pytest.fixture(scope="module")
def model_dir(gpus: int, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir("qwen2_5_vl", "7b", "qwen2_5_vl_7b", tmp_path_factory)


@pytest.fixture(scope="module")
def api_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The key the endpoint requires (the file listens beyond loopback) and its keys file."""
    key = secrets.token_urlsafe(24)
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key, path


def set_args(*sets: str) -> list[str]:
    """``--set KEY=VALUE`` for each override."""
    return [arg for s in sets for arg in ("--set", s)]


def overrides(model_dir: Path, gpus: int, *extra: str) -> list[str]:
    return set_args(f"model.source={model_dir}", f"model.served_name={SERVED}", "model.load_format=dummy",
                    f"tensor_parallel_size={gpus}", "accelerator_type=null", *extra)


def serve_env(key_file: Path, key: str) -> dict[str, str]:
    """This machine's environment plus the key; no RAY_ADDRESS and an empty state dir, so ``fleetserve
    serve`` starts its own Ray head here rather than using a cluster recorded by ``fleetserve up``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "FLEETSERVE_API_KEYS_FILE": str(key_file), "OPENAI_API_KEY": key,
            "FLEETSERVE_STATE_DIR": str(key_file.parent / "state"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def layout(kind: str, gpus: int) -> tuple[str, int, int, bool] | None:
    """``(name, TP, PP, FlagGems on)`` over the GPUs: ``tp`` puts them all in one TP group with FlagGems on;
    ``pp`` makes two pipeline stages (TP=1 x PP=2 on 2 GPUs, TP=2 x PP=2 on 4) with FlagGems off."""
    if kind == "tp":
        return f"tp{gpus}_flaggems", gpus, 1, True
    return (f"tp{gpus // 2}_pp2", gpus // 2, 2, False) if gpus >= 2 else None


def record(results_dir: Path, name: str, result: dict) -> None:
    """One deployment run, written whole with where it came from (commit, device, command line)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from provenance import provenance

    (results_dir / f"gpu_deployment_{name}.json").write_text(json.dumps({**provenance(), **result}, indent=1))


@contextlib.contextmanager
def served(file: Path, sets: list[str], key_file: Path, key: str, port: int, log_path: Path):
    """``fleetserve serve FILE --set ...`` until /health says 200; yields the seconds that took."""
    t0 = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", str(file), "--ready-timeout", "1500", *sets],
            cwd=ROOT, env=serve_env(key_file, key), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def up() -> bool:
                assert proc.poll() is None, f"fleetserve serve exited {proc.returncode}: " \
                                            f"{log_path.read_text()[-4000:]}"
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200

            wait_for(up, 1500, "the deployment answering /health 200", poll=5,
                     state=lambda: log_path.read_text()[-2000:])
            yield round(time.monotonic() - t0, 1)
        finally:
            stop_like_ctrl_c(proc, grace_s=180)


@pytest.fixture(scope="class", params=["tp", "pp"])
def endpoint(request: pytest.FixtureRequest, gpus: int, model_dir: Path, api_key: tuple[str, Path],
             results_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """deployments/qwen25_vl.yaml, only TP/PP (and FlagGems) changed through ``--set``; recorded at the end."""
    chosen = layout(request.param, gpus)
    if chosen is None:
        pytest.skip(f"layout {request.param} needs 2 GPUs or more ({gpus} visible)")
    name, tp, pp, gems = chosen
    key, key_file = api_key
    sets = overrides(model_dir, tp, f"pipeline_parallel_size={pp}", f"flaggems.enabled={str(gems).lower()}")
    result: dict = {"file": str(FILE.relative_to(ROOT)), "layout": name, "tensor_parallel_size": tp,
                    "pipeline_parallel_size": pp, "flaggems": gems, "overrides": sets[1::2], "checks": {}}
    with served(FILE, sets, key_file, key, PORT, tmp_path_factory.mktemp("serve") / "serve.log") as ready_s:
        result["ready_s"] = ready_s
        yield {"key": key, "headers": {"Authorization": f"Bearer {key}"}, "tp": tp, "pp": pp, "flaggems": gems,
               "result": result}
    record(results_dir, name, result)


def chat(ep: dict, content: object, base: str = BASE, model: str = SERVED) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", headers=ep["headers"], timeout=300, json={
        "model": model, "max_tokens": 16, "messages": [{"role": "user", "content": content}]})


def png_data_url(size: int = 224) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_data_url(seconds: float = 2.0, rate: int = 16000) -> str:
    """A 440 Hz tone as 16-bit mono WAV."""
    frames = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate)))
                      for i in range(int(seconds * rate)))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def checked(ep: dict, what: str, r: httpx.Response) -> dict:
    """Note the answer in the deployment's record, then hand back its body (asserting 200)."""
    ep["result"]["checks"][what] = {"status": r.status_code, "usage": r.json().get("usage") if r.status_code == 200
                                    else None, "error": None if r.status_code == 200 else r.text[:500]}
    assert r.status_code == 200, r.text
    return r.json()


class TestServedOnGpus:
    def test_text_chat(self, endpoint: dict) -> None:
        body = checked(endpoint, "text", chat(endpoint, "Say hello in one word."))
        assert body["model"] == SERVED and body["usage"]["completion_tokens"] > 0

    def test_image_chat(self, endpoint: dict) -> None:
        body = checked(endpoint, "image", chat(endpoint, [
            {"type": "text", "text": "What colour is this?"},
            {"type": "image_url", "image_url": {"url": png_data_url()}}]))
        # The image's tokens were in the prompt: far more than the text alone.
        assert body["usage"]["prompt_tokens"] > 64, body["usage"]

    def test_flaggems_report_from_every_worker(self, endpoint: dict) -> None:
        health = httpx.get(f"{BASE}/health", timeout=10).json()
        gems = health["models"][SERVED]["flaggems"]
        processes = gems["processes"]
        endpoint["result"]["flaggems_report"] = gems
        if not endpoint["flaggems"]:
            assert gems["summary"]["status"] == "none" and not processes, gems["summary"]
            return
        # The replica, the engine core and one worker per TP x PP rank (with TP=1 the worker may be the core).
        assert len(processes) >= 1 + endpoint["tp"] * endpoint["pp"], [p.get("process") for p in processes]
        assert gems["summary"]["status"] == "active" and gems["summary"]["failed"] == [], gems["summary"]
        assert gems["summary"]["triton_ops"], gems["summary"]
        for rep in processes:
            assert rep["status"] == "active", rep
            patched = {op for op, res in rep["ops"].items() if res.get("status") == "patched"}
            assert patched == set(gems["summary"]["triton_ops"]), (rep.get("process"), rep["ops"])


MINICPM_FILE = ROOT / "deployments" / "minicpm_o_26.yaml"
MINICPM_PORT = 9011  # the file's http_options.port
MINICPM_SERVED = "MiniCPM-o-2.6"


@pytest.fixture(scope="class")
def minicpm(gpus: int, api_key: tuple[str, Path], results_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """deployments/minicpm_o_26.yaml as in the file (TP=1), audio allowed through ``--set``."""
    model = make_model_dir("minicpm_o_26", "8b", "minicpm_o_26_8b", tmp_path_factory)
    key, key_file = api_key
    sets = set_args(f"model.source={model}", "model.load_format=dummy", "accelerator_type=null",
                    "limit_mm_per_prompt.audio=1")
    result: dict = {"file": str(MINICPM_FILE.relative_to(ROOT)), "layout": "tp1", "tensor_parallel_size": 1,
                    "pipeline_parallel_size": 1, "flaggems": False, "overrides": sets[1::2], "checks": {}}
    log = tmp_path_factory.mktemp("serve-minicpm") / "serve.log"
    with served(MINICPM_FILE, sets, key_file, key, MINICPM_PORT, log) as ready_s:
        result["ready_s"] = ready_s
        yield {"headers": {"Authorization": f"Bearer {key}"}, "result": result}
    record(results_dir, "minicpm_o_26", result)


class TestMiniCPMoOnGpus:
    base = f"http://127.0.0.1:{MINICPM_PORT}"

    def test_text_image_and_audio_chat(self, minicpm: dict) -> None:
        text = checked(minicpm, "text", chat(minicpm, "Say hello in one word.", self.base, MINICPM_SERVED))
        image = checked(minicpm, "image", chat(minicpm, [
            {"type": "text", "text": "What colour is this?"},
            {"type": "image_url", "image_url": {"url": png_data_url(448)}}], self.base, MINICPM_SERVED))
        audio = checked(minicpm, "audio", chat(minicpm, [
            {"type": "text", "text": "What do you hear?"},
            {"type": "audio_url", "audio_url": {"url": wav_data_url()}}], self.base, MINICPM_SERVED))
        base_tokens = text["usage"]["prompt_tokens"]
        # Each medium's tokens were in the prompt.
        assert image["usage"]["prompt_tokens"] > base_tokens + 32, image["usage"]
        assert audio["usage"]["prompt_tokens"] > base_tokens + 32, audio["usage"]


def test_overhead_vs_plain_vllm_recorded(gpus: int, model_dir: Path, api_key: tuple[str, Path],
                                         results_dir: Path) -> None:
    """serve_vs_plain.py on these GPUs, one run after another (FlagGems off in all): fleetserve on each
    data path (``ingress``, ``direct``) and plain vLLM; then its report."""
    key, key_file = api_key
    script = ROOT / "benchmarks" / "gpu" / "serve_vs_plain.py"
    sets = overrides(model_dir, gpus)
    env = serve_env(key_file, key)
    runs = (("serve", "serve", []), ("serve_direct", "serve", ["--set", "data_path=direct"]), ("plain", "plain", []))
    for label, phase, extra in runs:
        r = subprocess.run([sys.executable, str(script), "run", "--phase", phase, "--label", label,
                            "--model-dir", str(model_dir), "--out", str(results_dir / f"{label}.json"),
                            "--deadline-s", "1500", "--loads", OVERHEAD_LOADS, *sets, *extra],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        result = json.loads((results_dir / f"{label}.json").read_text())
        assert result.get("ready_s") is not None, (result.get("error"), r.stdout[-3000:], r.stderr[-3000:])
        failed = [ld for ld in result["loads"] if "error" in ld or ld.get("failed")]
        assert not failed, failed
    name = f"serve_vs_plain_qwen25vl7b_tp{gpus}"
    r = subprocess.run([sys.executable, str(script), "report", *(str(results_dir / f"{label}.json") for label, _, _
                                                                  in runs),
                        "--name", name, "--results-dir", str(results_dir)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((results_dir / f"{name}.json").read_text())
    assert out["commit"] and out["device"] and out["rows"]
    ratios = {label: [row["variants"][label].get("ratio") for row in out["rows"]]
              for label in ("serve", "serve_direct")}
    assert all(all(r) for r in ratios.values()), out["rows"]
    print(f"\noverhead vs plain vLLM ({out['device']}): " + "; ".join(
        f"{label}: " + ", ".join(f"{row['load']} {ratio:.1%}" for row, ratio in zip(out["rows"], values))
        for label, values in ratios.items()) + f"; JSON: {results_dir / name}.json")
