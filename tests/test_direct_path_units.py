"""The direct data path's middleware without a cluster (cluster/serving/direct.py).

What vLLM's app receives after fleetserve's checks ran in the replica: the
client's own bytes when nothing changed, a capped ``max_tokens`` or a fetched
image written back into the JSON otherwise, a 4xx for what breaks a limit, a
503 + Retry-After past the in-flight bound, and /health from the replica itself.
"""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest

from cluster.serving.direct import DirectEndpoint, ReplicaHealth, RequestChecks, install
from cluster.serving.spec import EndpointSpec, RequestLimits

from test_endpoint_security import png_bytes

MODEL = "m"


class Recorder:
    """Stands in for vLLM's app: records each body it got, answers 200 (optionally after a gate)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict[bytes, bytes]] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.bodies.append(message.get("body", b""))
        self.headers.append(dict(scope.get("headers", [])))
        if self.gate is not None:
            await self.gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})


def checks(limits: RequestLimits | None = None, max_images: int | None = 2) -> tuple[RequestChecks, Recorder]:
    app = Recorder()
    direct = DirectEndpoint(served_name=MODEL, endpoint=EndpointSpec(limits=limits or RequestLimits()),
                            max_images=max_images)
    return RequestChecks(app, direct), app


def client(asgi) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://replica")


def chat(content, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def run(coro):
    return asyncio.run(coro)


def test_unchanged_request_reaches_vllm_byte_for_byte() -> None:
    mw, app = checks()
    raw = json.dumps(chat("hello", max_tokens=4, stream=True)).encode()

    async def go():
        async with client(mw) as c:
            return await c.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})

    assert run(go()).status_code == 200
    assert app.bodies == [raw]


def test_cap_written_back_and_content_length_fixed() -> None:
    mw, app = checks(RequestLimits(max_tokens=64))

    async def go():
        async with client(mw) as c:
            return await c.post("/v1/chat/completions", json=chat("hello"))

    assert run(go()).status_code == 200
    sent = json.loads(app.bodies[0])
    assert sent["max_tokens"] == 64
    assert int(app.headers[0][b"content-length"]) == len(app.bodies[0])


def test_limits_are_4xx_before_vllm() -> None:
    mw, app = checks(RequestLimits(max_tokens=64), max_images=1)
    png = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    image = {"type": "image_url", "image_url": {"url": png}}

    async def go():
        async with client(mw) as c:
            over = await c.post("/v1/chat/completions", json=chat("hi", max_tokens=65))
            images = await c.post("/v1/chat/completions", json=chat([image, image, {"type": "text", "text": "x"}]))
            internal = await c.post("/v1/chat/completions", json=chat(
                [{"type": "image_url", "image_url": {"url": "ftp://10.0.0.1/x.png"}}]))
            audio = await c.post("/v1/chat/completions", json=chat(
                [{"type": "audio_url", "audio_url": {"url": "http://example.com/a.wav"}}]))
            completions = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 99})
            return over, images, internal, audio, completions

    over, images, internal, audio, completions = run(go())
    assert over.status_code == 400 and "endpoint.limits.max_tokens" in over.json()["message"]
    assert images.status_code == 400 and "too many images" in images.json()["message"]
    assert internal.status_code == 400 and "http(s)" in internal.json()["message"]
    assert audio.status_code == 400 and "data: URLs" in audio.json()["message"]
    assert completions.status_code == 400 and "endpoint.limits.max_n" in completions.json()["message"]
    assert app.bodies == []  # none reached vLLM


def test_body_that_does_not_parse_is_400_here() -> None:
    mw, app = checks()
    wrong_shape = json.dumps({"model": MODEL, "messages": "nope"}).encode()

    async def go():
        async with client(mw) as c:
            return [await c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
                    for body in (b"{not json", wrong_shape)]

    not_json, shape = run(go())
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["message"]
    assert shape.status_code == 400 and shape.json()["message"].startswith("messages")
    assert app.bodies == []


@pytest.mark.parametrize("part, says", [
    ({"image_url": "http://10.0.0.1/x.png"}, "has no type"),
    ({"image_url": {"url": "http://10.0.0.1/x.png"}}, "has no type"),
    ({"video_url": {"url": "http://10.0.0.1/v.mp4"}}, "has no type"),
    ({"type": "text", "text": "x", "uuid": "u1", "image_url": "http://10.0.0.1/x.png"}, "uuid"),
    ({"type": "input_image", "image_url": "http://10.0.0.1/x.png"}, "input_image"),
    ({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}, "must be an object"),
])
def test_media_parts_vllm_would_find_by_key_are_refused(part, says) -> None:
    """vLLM fetches media from parts the image checks would not see (no type, a uuid, input_image): 400."""
    mw, app = checks(max_images=1)

    async def go():
        async with client(mw) as c:
            return await c.post("/v1/chat/completions", json=chat([part, {"type": "text", "text": "what?"}]))

    r = run(go())
    assert r.status_code == 400 and says in r.json()["message"], r.text
    assert app.bodies == []


def test_only_the_served_routes_reach_vllm() -> None:
    """vLLM's app has routes beyond the ingress path's (/invocations reaches the engine): 404 here."""
    from cluster.serving.direct import ServedRoutesOnly

    app = Recorder()
    routes = ServedRoutesOnly(app)

    async def go():
        async with client(routes) as c:
            return {path: (await c.post(path, json=chat("x"))).status_code
                    for path in ("/invocations", "/v1/responses", "/tokenize", "/v1/chat/completions/batch",
                                 "/v1/chat/completions", "/v1/completions")} | {
                "GET /v1/models": (await c.get("/v1/models")).status_code,
                "GET /v1/models/m": (await c.get("/v1/models/m")).status_code,
                "GET /metrics": (await c.get("/metrics")).status_code}

    codes = run(go())
    assert codes == {"/invocations": 404, "/v1/responses": 404, "/tokenize": 404, "/v1/chat/completions/batch": 404,
                     "/v1/chat/completions": 200, "/v1/completions": 200, "GET /v1/models": 200,
                     "GET /v1/models/m": 200, "GET /metrics": 404}


def test_in_flight_bound_is_503_with_retry_after() -> None:
    mw, app = checks(RequestLimits(max_queued_requests=1))
    app.gate = asyncio.Event()

    async def go():
        async with client(mw) as c:
            first = asyncio.create_task(c.post("/v1/chat/completions", json=chat("a", max_tokens=2)))
            while not app.bodies:
                await asyncio.sleep(0.01)
            second = await c.post("/v1/chat/completions", json=chat("b", max_tokens=2))
            app.gate.set()
            return await first, second, await c.post("/v1/chat/completions", json=chat("c", max_tokens=2))

    first, second, third = run(go())
    assert first.status_code == 200 and third.status_code == 200
    assert second.status_code == 503 and second.headers["retry-after"] == "5"
    assert "max_queued_requests" in second.json()["message"]


class FakeServer:
    def __init__(self, healthy: bool | None) -> None:
        self.healthy = healthy

    async def check_health(self) -> None:
        if self.healthy is None:
            await asyncio.sleep(30)
        if self.healthy is False:
            raise RuntimeError("EngineDeadError")

    def replica_report(self) -> dict:
        return {"replica_host": "h1", "flaggems": {"summary": {"status": "none"}}}


@pytest.mark.parametrize("healthy, code, state", [(True, 200, "healthy"), (False, 503, "failed"),
                                                  (None, 503, "unavailable")])
def test_health_from_the_replica_within_a_second(healthy, code, state) -> None:
    health = ReplicaHealth(Recorder(), FakeServer(healthy), MODEL)

    async def go():
        async with client(health) as c:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            r = await c.get("/health")
            return r, loop.time() - t0

    r, seconds = run(go())
    assert seconds < 1.0
    assert r.status_code == code
    model = r.json()["models"][MODEL]
    assert model["state"] == state and model["data_path"] == "direct" and model["replica_host"] == "h1"
    if code != 200:
        assert r.headers["retry-after"] == "5" and model["reason"]


def test_installed_on_a_started_fastapi_app_keys_first_health_open() -> None:
    """vLLM's app has built its middleware stack before Serve hands it over; ours still goes in front."""
    from fastapi import FastAPI

    from cluster.serving.auth import _digest

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def reached() -> dict:
        return {"reached": True}

    app.middleware_stack = app.build_middleware_stack()
    direct = DirectEndpoint(served_name=MODEL, endpoint=EndpointSpec(api_keys_env="K"),
                            api_key_digests=(_digest("secret"),))
    install(app, FakeServer(True), direct)

    async def go():
        async with client(app) as c:
            return (await c.post("/v1/chat/completions", json=chat("x", max_tokens=2)),
                    await c.post("/v1/chat/completions", json=chat("x", max_tokens=2),
                                 headers={"Authorization": "Bearer secret"}),
                    await c.get("/health"))

    denied, allowed, health = run(go())
    assert denied.status_code == 401
    assert allowed.status_code == 200 and allowed.json() == {"reached": True}
    assert health.status_code == 200 and health.json()["models"][MODEL]["state"] == "healthy"


def test_a_cluster_without_haproxy_is_a_clear_error_at_build(tmp_path) -> None:
    """Ray's Python proxy cannot carry this path: the app is refused with the cluster settings that fix it."""
    from cluster.errors import ConfigError
    from cluster.serving.app import compose_app
    from cluster.serving.spec import load_serving_args

    serving = load_serving_args({"model": str(tmp_path), "data_path": "direct", "endpoint": {"api_keys_env": "K"}},
                                source="t")
    with pytest.raises(ConfigError) as exc:
        compose_app(serving)
    err = exc.value
    assert err.location == "args.data_path" and "HAProxy" in err.problem
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in err.fix and "data_path: ingress" in err.fix


def test_direct_path_serves_one_model_per_app(tmp_path) -> None:
    from cluster.errors import ConfigErrors
    from cluster.serving.spec import load_serving_args

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigErrors) as exc:
        load_serving_args({"data_path": "direct", "models": [
            {"model": {"source": str(tmp_path / "a"), "served_name": "a"}},
            {"model": {"source": str(tmp_path / "b"), "served_name": "b"}}]}, source="t.yaml")
    assert "one model per application" in str(exc.value)


def test_a_local_head_gets_the_paths_cluster_settings_only_for_a_direct_app(tmp_path) -> None:
    """`fleetserve serve FILE` starts its head with HAProxy on for a direct app, and as Ray's default otherwise."""
    from pathlib import Path

    from cluster.commands.serve_cmds import _head_env
    from cluster.serving.config_file import load_serve_config
    from cluster.serving.haproxy import CLUSTER_ENV

    tiny = Path(__file__).resolve().parents[1] / "deployments" / "tiny.yaml"
    sets = [f"model.source={tmp_path}", "endpoint.api_keys_env=K"]
    assert _head_env(load_serve_config(tiny, sets)) == {}
    assert _head_env(load_serve_config(tiny, [*sets, "data_path=direct"])) == CLUSTER_ENV
