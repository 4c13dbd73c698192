"""The direct data path: the vLLM replica is the HTTP endpoint, fleetserve's checks run in it.

Why: on the ``ingress`` path (proxy -> :class:`~cluster.serving.ingress.FleetIngress`
-> replica) every streamed chunk crosses two Ray actor hops in Python; on one
H100 that path levelled off near 4.4k output tokens/s, 59% of plain vLLM at
c=128 (docs/serving.md). Ray 2.58 can make the LLM replica the ingress itself:
its HAProxy forwards each HTTP request straight to a replica's port (the one with
the fewest open connections, see :func:`compose_direct_app`), and the replica
serves vLLM's own FastAPI app. With ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` that measured 97.4% of plain
vLLM at c=128 on one H100
(benchmarks/results/serve_vs_plain_qwen25vl7b_direct_tput_h100.json).

ray.serve.llm builds that app only from ``build_openai_app`` (its own ingress,
none of ours). This module composes the same deployment with our replica class
and adds, as ASGI middleware on vLLM's app inside the replica, what the ingress
adds on the other path:

* API keys, the body size limit and scrubbed 500s: the same middleware
  (:mod:`cluster.serving.auth`, :mod:`cluster.serving.limits`);
* request limits, message shape, image checks and http(s) images fetched under
  the media policy (:mod:`cluster.serving.checks`): :class:`RequestChecks`;
* the in-flight bound, per replica here: 503 + ``Retry-After`` when full;
* ``GET /health``: this replica's state, host and FlagGems report (vLLM's own
  ``/health`` says only 200);
* only the routes the ingress path serves (chat, completions, models, health):
  vLLM's app has more (``/invocations``, ``/v1/responses``, ``/tokenize``, ...)
  that would reach the engine past these checks; they answer 404.

What this path does not do, by construction (docs/serving.md): while no replica
runs, HAProxy answers 503 at once, without our reason (``fleetserve status``
and ``serve status`` give it); a request that reached a replica which then died
is not replayed; ``retry_attempts``, ``request_timeout_s`` and
``ingress_replicas`` do not apply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from cluster.serving.auth import relative_path, send_json_error
from cluster.serving.checks import check_chat
from cluster.serving.limits import (RETRY_AFTER_S, ChatRequest, CompletionsRequest, InFlight, RequestRejected,
                                   apply_limits, replaying)
from cluster.serving.media import ImageFetcher, image_parts
from cluster.serving.spec import EndpointSpec

logger = logging.getLogger("ray.serve")

#: /health answers within 1 s: the most it waits for the engine's own health check.
HEALTH_CHECK_WAIT_S = 0.8
#: How long /health reuses the FlagGems report it read (files and Ray's KV), and the most it waits for one.
REPORT_TTL_S = 10.0
REPORT_WAIT_S = 0.5
#: Bodies larger than this are parsed off the event loop the replica streams tokens from.
PARSE_IN_THREAD_BYTES = 256 << 10
class DirectEndpoint(BaseModel):
    """What the replica needs to act as the endpoint (bound into the deployment, pickled by Serve)."""

    model_config = ConfigDict(frozen=True)

    served_name: str
    endpoint: EndpointSpec
    api_key_digests: tuple[bytes, ...] = ()
    max_images: int | None = None
    max_image_bytes: int = 20 << 20


def install(app: Any, server: Any, direct: DirectEndpoint) -> None:
    """Add fleetserve's endpoint middleware to vLLM's FastAPI ``app`` inside ``server``'s replica."""
    from cluster.serving.auth import ApiKeyMiddleware
    from cluster.serving.limits import BodyLimitMiddleware, HideServerErrorsMiddleware

    # vLLM's app has already built its middleware stack once (Starlette then refuses
    # add_middleware); it serves no request yet, so let Starlette build it again, with ours.
    app.middleware_stack = None
    # Starlette runs the middleware added last first: 500s are scrubbed around everything,
    # /health answers before the key check (it is open, as on the ingress path), other
    # routes than the served ones are 404, keys are checked before the body is read, then
    # its size, then its content.
    app.add_middleware(RequestChecks, direct=direct)
    app.add_middleware(BodyLimitMiddleware, max_bytes=direct.endpoint.limits.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, digests=direct.api_key_digests)
    app.add_middleware(ServedRoutesOnly)
    app.add_middleware(ReplicaHealth, server=server, served_name=direct.served_name)
    app.add_middleware(HideServerErrorsMiddleware)


class ServedRoutesOnly:
    """404 for every route but chat, completions and models (``/health`` is answered before this)."""

    ROUTES = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models")}

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = relative_path(scope), scope.get("method")
        if method == "OPTIONS":  # CORS preflight of a served route
            method = dict(scope.get("headers", [])).get(b"access-control-request-method", b"").decode("latin-1")
        if (method, path) in self.ROUTES or (method == "GET" and path.startswith("/v1/models/")):
            return await self.app(scope, receive, send)
        await send_json_error(send, 404, f"{path[:100]} is not served here (chat, completions, models, health)",
                              "NotFoundError")


async def _read_body(receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class RequestChecks:
    """Limits, image checks and fetching for chat/completions requests, and the in-flight bound.

    The body is parsed once here with the same request models the ingress uses;
    what the checks change (a ``max_tokens`` cap, fetched images as ``data:``
    URLs) is written back into the client's JSON, which vLLM then parses itself.
    A body these models cannot parse is a 400 here (vLLM parses with the same
    models; an unknown model name is still vLLM's 404).
    """

    ROUTES = {"/v1/chat/completions": True, "/v1/completions": False}

    def __init__(self, app, direct: DirectEndpoint):
        self.app = app
        self.direct = direct
        self.fetcher = ImageFetcher(direct.endpoint.media)
        self.in_flight = InFlight(direct.endpoint.limits.max_queued_requests)

    async def __call__(self, scope, receive, send):
        chat = self.ROUTES.get(relative_path(scope)) if scope["type"] == "http" else None
        if chat is None or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        model = self.direct.served_name
        if not self.in_flight.try_enter(model):
            return await send_json_error(
                send, 503, f"this replica of {model!r} has {self.in_flight.bound} requests in flight, the most it "
                           "queues (endpoint.limits.max_queued_requests); retry shortly",
                "ServiceUnavailable", {"Retry-After": str(RETRY_AFTER_S)})
        try:
            body = await _read_body(receive)
            if body is None:
                return
            try:
                checked = await self._checked(body, chat)
            except RequestRejected as rej:
                return await send_json_error(send, rej.code, rej.message, rej.err_type)
            if checked is not body:
                headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
                scope = {**scope, "headers": headers + [(b"content-length", str(len(checked)).encode())]}
            # Returns when the response's last chunk went out: a stream stays counted until then.
            return await self.app(scope, replaying(checked, receive), send)
        finally:
            self.in_flight.leave(model)

    async def _checked(self, body: bytes, chat: bool) -> bytes:
        """``body`` itself when nothing changed, else the re-encoded JSON; raises :class:`RequestRejected`."""
        if len(body) > PARSE_IN_THREAD_BYTES:
            raw, request = await asyncio.to_thread(_parse, body, chat)
        else:
            raw, request = _parse(body, chat)
        direct = self.direct
        asked_tokens = request.max_tokens
        if chat:
            limits = {"max_images": direct.max_images, "max_image_bytes": direct.max_image_bytes}
            await check_chat(request, direct.endpoint, limits, self.fetcher, direct.served_name)
        else:
            apply_limits(request, direct.endpoint.limits, chat=False)
        changed = False
        if request.max_tokens != asked_tokens:  # the endpoint's cap (limits.max_tokens) was applied
            raw["max_tokens"] = request.max_tokens
            changed = True
        if chat:
            sent = image_parts(SimpleNamespace(messages=raw.get("messages")))
            for part, checked in zip(sent, image_parts(request)):
                url = checked["image_url"]["url"]
                if part["image_url"].get("url") != url:  # content_part_problem: image_url is an object
                    part["image_url"]["url"] = url
                    changed = True
        return json.dumps(raw).encode() if changed else body


def _parse(body: bytes, chat: bool) -> tuple[dict[str, Any], Any]:
    """The client's JSON and the request model parsed from it; a 400 for either failing."""
    try:
        raw = json.loads(body)
    except ValueError as exc:
        raise RequestRejected(400, f"the request body is not valid JSON ({exc})"[:300]) from None
    if not isinstance(raw, dict):
        raise RequestRejected(400, "the request body must be a JSON object")
    try:
        return raw, (ChatRequest if chat else CompletionsRequest).model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())) or "body"
        raise RequestRejected(400, f"{where}: {first.get('msg', 'invalid request')}"[:300]) from None


class ReplicaHealth:
    """``GET /health`` of the replica: 200 with its host and FlagGems report, 503 with the reason.

    Answers within a second: the engine's check (at most ``HEALTH_CHECK_WAIT_S``)
    and the report (read off the event loop, at most ``REPORT_WAIT_S``, reused for
    ``REPORT_TTL_S``) are awaited together.
    """

    def __init__(self, app, server: Any, served_name: str):
        self.app = app
        self.server = server
        self.served_name = served_name
        self._report: tuple[float, dict[str, Any]] | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or relative_path(scope) != "/health" or scope.get("method") not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        (state, reason, code), report = await asyncio.gather(self._engine_state(), self._replica_report())
        model = {"state": state, "reason": reason, "data_path": "direct", **report}
        content = {"status": "ok" if code == 200 else "unavailable", "models": {self.served_name: model}}
        body = json.dumps(content).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if code != 200:
            headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})

    async def _engine_state(self) -> tuple[str, str, int]:
        try:
            await asyncio.wait_for(self.server.check_health(), timeout=HEALTH_CHECK_WAIT_S)
        except asyncio.TimeoutError:
            return "unavailable", "the engine did not answer its health check within a second", 503
        except Exception as exc:
            return "failed", f"the engine is unhealthy: {type(exc).__name__}: {exc}"[:300], 503
        return "healthy", "", 200

    async def _replica_report(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._report is None or now - self._report[0] > REPORT_TTL_S:
            try:
                report = await asyncio.wait_for(asyncio.to_thread(self.server.replica_report),
                                                timeout=REPORT_WAIT_S)
            except Exception:
                logger.debug("fleetserve: replica report unavailable", exc_info=True)
                report = {"replica_host": os.uname().nodename}
            self._report = (now, report)
        return self._report[1]


def compose_direct_app(serving: Any, api_key_digests: tuple[bytes, ...]):
    """The Serve app of the direct path: our replica class as the ingress, HAProxy picking the replica.

    Uses ray.serve.llm's direct-streaming builder (private in Ray 2.58.0, checked
    against it), which wires the replica's late-bound ASGI app
    (``FleetLLMServer.__serve_build_asgi_app__``). Its ``build_openai_app`` also puts an
    ``LLMRouter`` deployment beside it, which HAProxy asks over HTTP, from Lua, for every
    POST (after buffering the body) which replica to use. With the request router our
    specs give (none set: ray.serve.llm's ``RoundRobinRouter``) that Python call per
    request picks in turn, blind to load; without it HAProxy balances the replicas'
    own ports itself, by least connections (Ray's default ``leastconn``), which for
    streams of unequal length is the load-aware pick, with no hop. The router earns its
    hop only for policies that read the body (KV- or prefix-aware routing), which the
    spec does not offer.
    """
    from ray.llm._internal.serve.core.ingress.builder import _build_direct_streaming_llm_deployment
    from ray.serve.config import RequestRouterConfig
    from ray.serve.llm import LLMConfig

    from cluster.serving.app import llm_config_for
    from cluster.serving.engine import FleetLLMServer

    (spec,) = serving.models
    config = llm_config_for(spec)
    config["engine_kwargs"]["enable_log_requests"] = serving.endpoint.log_prompts
    llm_config = LLMConfig(**config)
    direct = DirectEndpoint(served_name=spec.served_name, endpoint=serving.endpoint, api_key_digests=api_key_digests,
                            max_images=spec.limit_mm_per_prompt.get("image"), max_image_bytes=spec.max_image_bytes)
    # Serve's default router config: the builder's RoundRobinRouter would be refused on an ingress
    # deployment that HAProxy balances (Ray 2.58 build_app), and HAProxy does the picking here anyway.
    return _build_direct_streaming_llm_deployment(llm_config, deployment_cls=FleetLLMServer,
                                                  bind_kwargs={"direct": direct},
                                                  override_serve_options={"request_router_config": RequestRouterConfig()})
