"""End to end: deployments/tiny.yaml on a real Ray cluster with real vLLM (CPU).

One module-scoped app with one vLLM replica behind the OpenAI endpoint; the
tests talk to it with the real ``openai`` client and raw HTTP. Several replicas
behind one endpoint, and losing one under load, are the emulated-host tests'
(tests/test_fleet_hosts.py, as root: replicas on two hosts, a host lost with no
request failed, the replica rebuilt on the other); a replica actor killed on a
live node is the opt-in soak's (tests/test_scaling.py). Without root, neither runs.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import http.server
import io
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tinyqwen2 import CPU_ENGINE_ENV
from waiting import REQUEST_TIMEOUT_S, wait_healthy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PORT = 8010
BASE = f"http://127.0.0.1:{PORT}"
MODEL = "tiny-qwen2.5-vl"


def png_bytes(color=(200, 30, 30), size=(64, 64)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


@pytest.fixture(scope="module")
def image_server():
    """A PNG served over http on 127.0.0.1 (for image_url with an http URL)."""
    payload = png_bytes((10, 120, 240))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/cat.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def app(tiny_model, ray_local):
    from ray import serve

    from cluster.serving.app import build_app

    cfg = yaml.safe_load((ROOT / "deployments/tiny.yaml").read_text())
    args = cfg["applications"][0]["args"]
    args["model"]["source"] = str(tiny_model)
    args["runtime_env"] = {"env_vars": dict(CPU_ENGINE_ENV)}
    # image_server listens on 127.0.0.1, which the media policy denies unless allowed.
    args["endpoint"] = {"media": {"allowed_networks": ["127.0.0.1/32"]}}
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    t0 = time.time()
    serve.run(build_app(args), name="tiny", route_prefix="/", blocking=False)
    wait_healthy(BASE, 600)
    print(f"app ready in {time.time() - t0:.1f}s")
    yield
    serve.delete("tiny")
    serve.shutdown()


@pytest.fixture(scope="module")
def client(app):
    from openai import OpenAI

    return OpenAI(base_url=f"{BASE}/v1", api_key="none", timeout=REQUEST_TIMEOUT_S, max_retries=0)


def chat(**kw) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 8, **kw}
    return httpx.post(f"{BASE}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)


def error_message(r: httpx.Response) -> str:
    """The reason in an OpenAI-style error body (``{"error": {"message": ...}}``)."""
    return r.json()["error"]["message"]


def assert_still_serving():
    r = chat(messages=[{"role": "user", "content": "still there?"}])
    assert r.status_code == 200, r.text


def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_chat_text(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a sunset."}], max_tokens=12, temperature=0
    )
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.completion_tokens > 0 and out.usage.prompt_tokens > 5


def test_completions(client):
    out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert out.usage.completion_tokens > 0


#: Qwen2.5-VL's <|vision_start|>, <|vision_end|> and <|image_pad|> ids, as make-model writes them.
VISION_START, VISION_END, IMAGE_PAD = 151652, 151653, 151655


def test_chat_image_data_url(client):
    """The image reaches the model as the made model's processor says: 224x168 -> 48 merged patches."""
    msgs = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(size=(224, 168)))}},
        {"type": "text", "text": "What is in the image?"},
    ]}]
    out = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8,
                                         extra_body={"return_token_ids": True})
    assert out.usage.completion_tokens == len(out.choices[0].token_ids) > 0
    ids = out.prompt_token_ids
    assert ids.count(IMAGE_PAD) == 48
    assert ids.index(VISION_START) + 49 == ids.index(VISION_END)


def test_chat_image_http_url(client, image_server):
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "Caption this."},
        {"type": "image_url", "image_url": {"url": f"{image_server}/cat.png"}},
    ]}]
    out = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8)
    assert out.usage.completion_tokens > 0


def test_streaming_sse(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=10, stream=True
    )
    chunks = list(stream)
    assert len(chunks) >= 3
    assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason is not None
    with httpx.stream("POST", f"{BASE}/v1/chat/completions", timeout=REQUEST_TIMEOUT_S, json={
        "model": MODEL, "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"


def test_concurrent_requests_are_all_answered(client):
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: chat(messages=[{"role": "user", "content": f"q{i}"}]).status_code,
                                range(16)))
    assert results == [200] * 16


def test_health_reports_each_model(client):
    r = httpx.get(f"{BASE}/health", timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["models"][MODEL]["state"] == "healthy", body


# -- bad requests: 4xx with a reason, and the replica keeps serving --------------------

def test_too_many_images_is_400(client):
    img = {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}
    r = chat(messages=[{"role": "user", "content": [img, img, img, {"type": "text", "text": "x"}]}])
    assert r.status_code == 400
    assert "too many images" in error_message(r)
    assert_still_serving()


def test_undecodable_image_is_400(client):
    bad = {"type": "image_url", "image_url": {"url": data_url(b"definitely not a png")}}
    r = chat(messages=[{"role": "user", "content": [bad, {"type": "text", "text": "x"}]}])
    assert r.status_code == 400
    assert "cannot decode" in error_message(r)
    assert_still_serving()


def test_broken_http_image_is_4xx(client, image_server):
    bad = {"type": "image_url", "image_url": {"url": f"{image_server}/missing.png"}}
    r = chat(messages=[{"role": "user", "content": [bad, {"type": "text", "text": "x"}]}])
    assert 400 <= r.status_code < 500, r.text
    assert error_message(r)
    assert_still_serving()


def test_prompt_too_long_is_400(client):
    r = chat(messages=[{"role": "user", "content": "word " * 6000}])
    assert r.status_code == 400, r.text
    reason = error_message(r).lower()
    assert "context" in reason or "too long" in reason, reason
    assert_still_serving()


def test_unknown_model_is_404(client):
    r = httpx.post(f"{BASE}/v1/chat/completions", timeout=30,
                   json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    assert "no-such-model" in r.text
    assert_still_serving()


def test_malformed_body_is_4xx(client):
    r = httpx.post(f"{BASE}/v1/chat/completions", timeout=30, json={"model": MODEL, "messages": "nope"})
    assert 400 <= r.status_code < 500
    r = httpx.post(f"{BASE}/v1/chat/completions", timeout=30, content=b"{not json",
                   headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    assert_still_serving()


def test_bad_requests_did_not_kill_replicas(client):
    from ray import serve

    test_too_many_images_is_400(client)
    status = serve.status().applications["tiny"]
    llm = [d for name, d in status.deployments.items() if "LLMServer" in name][0]
    assert llm.replica_states == {"RUNNING": 1}, llm.replica_states  # none starting, none failed
