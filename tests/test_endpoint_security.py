"""The OpenAI endpoint under attack (issue 9): keys, media fetching, limits, malformed input.

One app (deployments/tiny.yaml's model) with API keys from an env var, a media
policy that allows only 127.0.0.2 (a local test image server) so the default
denial of every other loopback/private/metadata address is what the attacks
meet, and small limits so each is cheap to hit.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import http.server
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
import yaml

from tinyqwen2 import CPU_ENGINE_ENV
from waiting import REQUEST_TIMEOUT_S, wait_healthy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PORT = 8012
BASE = f"http://127.0.0.1:{PORT}"
MODEL = "tiny-qwen2.5-vl"
KEY = "fs-test-" + "k" * 40
AUTH = {"Authorization": f"Bearer {KEY}"}
SECRET_ENV_VALUE = "runtime-env-secret-value-123"
FETCH_TIMEOUT_S = 3.0
MAX_IMAGE_BYTES = 1 << 20
MAX_BODY_BYTES = 4 << 20


def png_bytes(size=(32, 32)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def huge_png_header(width=12000, height=12000) -> bytes:
    """A PNG that claims width x height pixels in a few bytes (the header is what must be checked)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def image_server():
    """Serves on 127.0.0.2 (the one address the app's policy allows): a PNG, a huge PNG, a body over
    the byte limit, a redirect to 127.0.0.1, and a path that accepts and never answers."""
    small, huge, internal = png_bytes(), huge_png_header(), f"{BASE}/health"
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/hang":
                stop.wait(60)
                return
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", internal)
                self.end_headers()
                return
            body = {"/ok.png": small, "/huge.png": huge, "/big.png": b"\0" * (2 * MAX_IMAGE_BYTES)}.get(self.path)
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            if self.path != "/big.png":  # the byte limit must hold while streaming, not only by header
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.2:{server.server_address[1]}"
    stop.set()
    server.shutdown()


@pytest.fixture(scope="module")
def app(tiny_model, ray_local):
    from ray import serve

    from cluster.serving.app import build_app

    cfg = yaml.safe_load((ROOT / "deployments/tiny.yaml").read_text())
    args = cfg["applications"][0]["args"]
    args["model"]["source"] = str(tiny_model)
    args["max_image_bytes"] = MAX_IMAGE_BYTES
    args["runtime_env"] = {"env_vars": {**CPU_ENGINE_ENV, "FLEETSERVE_TEST_SECRET": SECRET_ENV_VALUE}}
    args["endpoint"] = {
        "api_keys_env": "FLEETSERVE_TEST_API_KEYS",
        "media": {"allowed_networks": ["127.0.0.2/32"], "fetch_timeout_s": FETCH_TIMEOUT_S},
        "limits": {"max_n": 4, "max_tokens": 64, "max_body_bytes": MAX_BODY_BYTES, "max_queued_requests": 3},
    }
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FLEETSERVE_TEST_API_KEYS", f"other-key,{KEY}")
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(build_app(args), name="sec", route_prefix="/", blocking=False)
        wait_healthy(BASE, 600)
        yield
        serve.delete("sec")
        serve.shutdown()


def chat(messages, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{BASE}/v1/chat/completions", headers=headers, timeout=REQUEST_TIMEOUT_S,
                      json={"model": MODEL, "max_tokens": 4, "messages": messages, **kw})


def image_chat(url: str) -> httpx.Response:
    return chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "x"}]}])


def assert_openai_error(r: httpx.Response, *codes: int) -> str:
    assert r.status_code in codes, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    assert "Traceback" not in r.text and "ray.llm._internal" not in r.text and len(r.text) < 2000, r.text
    return err["message"]


def assert_still_serving():
    r = chat([{"role": "user", "content": "still there?"}])
    assert r.status_code == 200, r.text


# -- keys ---------------------------------------------------------------------------

def test_no_key_and_wrong_key_are_401_right_key_200(app):
    msg = [{"role": "user", "content": "hi"}]
    assert "API key" in assert_openai_error(chat(msg, key=None), 401)
    assert assert_openai_error(chat(msg, key="wrong"), 401) == "invalid API key"
    assert chat(msg).status_code == 200
    r = httpx.post(f"{BASE}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=60)
    assert_openai_error(r, 401)
    assert httpx.get(f"{BASE}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{BASE}/v1/models", headers=AUTH, timeout=30).status_code == 200
    assert httpx.get(f"{BASE}/openapi.json", timeout=30).status_code == 401


def test_health_is_open_and_reveals_no_secret(app):
    r = httpx.get(f"{BASE}/health", timeout=30)
    assert r.status_code == 200
    for secret in (KEY, SECRET_ENV_VALUE, "Traceback"):
        assert secret not in r.text


# -- media fetching -------------------------------------------------------------------

DENIED = "not a public address"


@pytest.mark.parametrize("url", [
    f"http://127.0.0.1:{PORT}/health",
    "http://127.0.0.1:8265/api/jobs/",
    "http://127.0.0.1:1/x.png",
    "http://localhost:22/",
    "http://[::1]:8000/",
    "http://0.0.0.0:8000/",
    "http://10.0.0.1/x.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[::ffff:127.0.0.1]/",
])
def test_internal_addresses_are_denied_alike(app, url):
    t0 = time.monotonic()
    message = assert_openai_error(image_chat(url), 400)
    assert DENIED in message and url.split("//")[1].split("/")[0] not in message
    assert time.monotonic() - t0 < 10


def test_media_parts_read_by_key_are_400(app, image_server):
    """Parts vLLM reads by key rather than by type (no type, a uuid, input_image) would have bypassed the
    media policy: vLLM fetched such URLs itself. Refused on the ingress path as on the direct one."""
    internal = "http://10.0.0.1/x.png"
    for part, says in (({"image_url": internal}, "has no type"),
                       ({"type": "text", "text": "x", "uuid": "u", "image_url": internal}, "uuid"),
                       ({"type": "input_image", "image_url": internal}, "input_image"),
                       ({"type": "image_url", "image_url": f"{image_server}/ok.png"}, "must be an object")):
        r = chat([{"role": "user", "content": [part, {"type": "text", "text": "x"}]}])
        assert says in assert_openai_error(r, 400), part
    assert_still_serving()


def test_file_and_other_schemes_are_400(app):
    for url in ("file:///etc/passwd", "ftp://example.com/x.png", "gopher://127.0.0.1/"):
        assert "only http(s)" in assert_openai_error(image_chat(url), 400)
    assert_still_serving()


def test_allowed_network_image_is_fetched(app, image_server):
    assert image_chat(f"{image_server}/ok.png").status_code == 200


def test_server_that_never_answers_is_4xx_within_deadline(app, image_server):
    t0 = time.monotonic()
    message = assert_openai_error(image_chat(f"{image_server}/hang"), 400)
    elapsed = time.monotonic() - t0
    assert "within" in message
    assert elapsed < FETCH_TIMEOUT_S + 5, elapsed
    assert_still_serving()


def test_redirect_to_loopback_is_denied(app, image_server):
    assert DENIED in assert_openai_error(image_chat(f"{image_server}/redirect"), 400)
    assert_still_serving()


def test_pixel_limit_before_decoding(app, image_server):
    assert "pixels" in assert_openai_error(image_chat(f"{image_server}/huge.png"), 400)
    assert "pixels" in assert_openai_error(image_chat(data_url(huge_png_header())), 400)
    assert_still_serving()


def test_image_over_byte_limit_while_streaming(app, image_server):
    assert "byte limit" in assert_openai_error(image_chat(f"{image_server}/big.png"), 413)
    assert_still_serving()


# -- request limits ---------------------------------------------------------------------

def test_n_is_capped(app):
    msg = [{"role": "user", "content": "hi"}]
    assert "max_n" in assert_openai_error(chat(msg, n=1000), 400)
    assert "max_n" in assert_openai_error(chat(msg, n=5), 400)
    assert len(chat(msg, n=2).json()["choices"]) == 2


def test_max_tokens_negative_and_over_cap_are_400(app):
    msg = [{"role": "user", "content": "hi"}]
    assert "at least 1" in assert_openai_error(chat(msg, max_tokens=-1), 400)
    assert "max_tokens" in assert_openai_error(chat(msg, max_tokens=65), 400)
    r = httpx.post(f"{BASE}/v1/completions", headers=AUTH, timeout=60,
                   json={"model": MODEL, "prompt": "x", "max_tokens": -3})
    assert "at least 1" in assert_openai_error(r, 400)


def test_body_over_limit_is_413(app):
    r = httpx.post(f"{BASE}/v1/chat/completions", headers={**AUTH, "content-type": "application/json"}, timeout=60,
                   content=b'{"model": "x", "pad": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}')
    assert_openai_error(r, 413)
    assert_still_serving()


def test_full_queue_is_503_with_retry_after_at_once(app):
    body = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "go on and on"}]}

    def one(_):
        t0 = time.monotonic()
        r = httpx.post(f"{BASE}/v1/chat/completions", headers=AUTH, json=body, timeout=300)
        return r.status_code, r.headers.get("retry-after"), time.monotonic() - t0

    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    full = [r for r in results if r[0] == 503]
    assert full and all(r[1] for r in full), results
    assert all(code in (200, 503) for code, _, _ in results), results
    assert_still_serving()


# -- malformed requests: 4xx, short, no traceback ---------------------------------------

MALFORMED = [b"[null, null]", b"[]", b'"x"', b"1", b"null", b"{not json",
             b'{"model": "tiny-qwen2.5-vl", "messages": [{"content": "no role"}]}',
             b'{"model": "tiny-qwen2.5-vl", "messages": []}',
             b'{"model": "tiny-qwen2.5-vl", "messages": [null]}',
             b'{"model": "tiny-qwen2.5-vl", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
             b'{"model": "tiny-qwen2.5-vl", "messages": [{"role": "user", "content": [{"type": "image_url", '
             b'"image_url": {"url": 5}}]}]}',
             b'{"model": "tiny-qwen2.5-vl", "messages": [{"role": "user", "content": [{"type": "video_url", '
             b'"video_url": {"url": "http://169.254.169.254/"}}]}]}']


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("raw", MALFORMED, ids=lambda b: b[:40].decode())
def test_malformed_body_is_4xx(app, path, raw):
    r = httpx.post(f"{BASE}{path}", headers={**AUTH, "content-type": "application/json"}, content=raw, timeout=60)
    assert_openai_error(r, 400, 404, 422)


def test_schemathesis_finds_no_server_error(app):
    """Bounded fuzzing (fixed seed) of both POST endpoints, positive and negative bodies.

    Valid bodies generate (up to the endpoint's max_tokens cap), invalid ones are answered at
    once: fewer of the first keep the test to a few minutes on 2 cores."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    spec = httpx.get(f"{BASE}/openapi.json", headers=AUTH, timeout=30).json()
    schema = schemathesis.openapi.from_dict(spec)
    failures: list[tuple] = []
    for path in ("/v1/chat/completions", "/v1/completions"):
        op = schema[path]["POST"]
        for mode, examples in ((GenerationMode.POSITIVE, 30), (GenerationMode.NEGATIVE, 60)):
            @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(op.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(base_url=BASE, headers=AUTH, timeout=120)
                if response.status_code >= 500 or "Traceback" in response.text:
                    failures.append((path, mode.value, repr(case.body)[:300], response.status_code,
                                     response.text[:300]))

            run()
    assert not failures, failures
    assert_still_serving()


def test_prompts_and_secrets_stay_out_of_logs(app, ray_local):
    marker = "zebra" + "quokka" * 3
    assert chat([{"role": "user", "content": f"remember {marker}"}]).status_code == 200
    assert chat([{"role": "user", "content": "x"}], key=KEY + "x").status_code == 401
    logs = Path(ray_local._private.worker._global_node.get_logs_dir_path())
    for path in logs.rglob("*"):
        if path.is_file() and path.stat().st_size < 50 << 20:
            text = path.read_text(errors="replace")
            for secret in (marker, KEY):
                assert secret not in text, (secret, path)
