"""OpenAI-compatible ingress: ``ray.serve.llm``'s router plus what it lacks.

``OpenAiIngress`` (ray.serve.llm) already routes ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/models`` to the vLLM replicas and turns engine
errors into OpenAI error bodies. This subclass adds only:

* ``GET /health`` -- 200 when every model has a live replica, else 503, with
  each replica's FlagGems kernel report (which ops run as Triton kernels).
* Input checks that must not cost a replica anything: the image count against
  ``limit_mm_per_prompt`` and ``data:`` images that do not decode are answered
  400 here with the reason (vLLM would otherwise fail them deep in its
  multimodal processor after the request was scheduled).
* Endpoint hardening (spec ``endpoint:``, docs/security.md): request limits
  (:mod:`cluster.serving.limits`), http(s) images fetched here under the media
  policy and handed to the replica as ``data:`` URLs (:mod:`cluster.serving.media`),
  a per-model in-flight bound (503 + ``Retry-After`` when full), and engine
  errors cut to their first sentence. API keys, the body size limit and the
  scrubbing of 500s are ASGI middleware added in ``app.compose_app``.
* Retries of requests that failed before any byte reached the client (the
  replica died or none could take it), then 503 with ``Retry-After`` rather
  than a hang. A response that already started streaming is never replayed.
* No hang when a model has no replica: Serve's router queues a request until
  some replica exists (minutes, for a vLLM restart). The ingress watches the
  replica states Serve's controller reports (one ``serve.status()`` a second)
  and answers 503 + ``Retry-After`` at once when the model has no RUNNING
  replica, or as soon as a queued request's model has no replica left at all;
  every request is bounded by ``request_timeout_s`` (then 504).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException
from ray.serve.llm.ingress import OpenAiIngress

from cluster.serving.checks import check_chat
from cluster.serving.limits import (RETRY_AFTER_S, ChatRequest, CompletionsRequest, InFlight, RequestRejected,
                                   apply_limits)
from cluster.serving.media import ImageFetcher
from cluster.serving.status import failure_reason
from cluster.serving.spec import EndpointSpec

logger = logging.getLogger("ray.serve")

#: How often the ingress refreshes replica states from Serve's controller.
REPLICA_POLL_S = 1.0
#: How often (and how long at most) it asks each running replica for its host and kernel report.
REPORT_POLL_S = 10.0
#: /health must answer within 1 s: the most it waits for the watcher's very first poll.
FIRST_POLL_WAIT_S = 0.6
#: Replica states that take requests: a replica being migrated off a drained node
#: keeps serving until its replacement runs.
SERVING_STATES = ("RUNNING", "PENDING_MIGRATION")


def _error(code: int, message: str, err_type: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"object": "error", "message": message, "type": err_type, "code": code,
            "error": {"message": message, "type": err_type, "code": code}}
    return JSONResponse(status_code=code, content=body, headers=headers)


def client_message(message: str, status_code: int) -> str:
    """What of an engine error a client sees: its first sentence, never internals.

    Ray Serve LLM composes ``Message: X, Internal exception: Y, original
    exception: Z`` where Y and Z carry module paths and remote tracebacks.
    """
    if status_code >= 500:
        return "internal error while serving the request"
    if message.startswith("Message: "):
        message = message[len("Message: "):]
    message = message.split(", Internal exception:")[0].strip()
    return (message.splitlines() or ["bad request"])[0][:500]


def _is_retryable(exc: BaseException) -> bool:
    """Failures that happen before a replica produced anything: safe to resend."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    return isinstance(
        exc, (ActorDiedError, ActorUnavailableError, RayActorError, BackPressureError, DeploymentUnavailableError)
    )


class _NoReplica(Exception):
    """The model has no replica that could be serving a queued request."""


class _Timeout(Exception):
    """request_timeout_s passed before the first byte."""


class FleetIngress(OpenAiIngress):
    """The fleetserve ingress deployment (see module docstring)."""

    def __init__(
        self,
        llm_deployments: dict[str, Any],
        model_cards: dict[str, Any],
        *,
        lora_paths: dict[str, str] | None = None,
        input_limits: dict[str, dict[str, Any]] | None = None,
        retry_attempts: int = 2,
        request_timeout_s: float = 600.0,
        endpoint: EndpointSpec | None = None,
        **kwargs: Any,
    ):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        self._input_limits = input_limits or {}
        self._endpoint = endpoint or EndpointSpec()
        self._fetcher = ImageFetcher(self._endpoint.media)
        self._in_flight = InFlight(self._endpoint.limits.max_queued_requests)
        from PIL import Image

        # Anything in this process that decodes an image stops at the spec's limit
        # (PIL warns above it and refuses above twice it).
        Image.MAX_IMAGE_PIXELS = self._endpoint.media.max_image_pixels
        self._retry_attempts = retry_attempts
        self._request_timeout_s = request_timeout_s
        self.counters = {"requests": 0, "retried": 0, "rejected": 0, "unavailable": 0, "timed_out": 0,
                         "queue_full": 0}
        # "app/deployment" -> Serve's view of it; empty until the first poll.
        self._deployments: dict[str, DeploymentView] = {}
        # model id -> the replica's fleet_status (host, kernel reports), refreshed by the watcher.
        self._reports: dict[str, dict[str, Any]] = {}
        self._watcher: asyncio.Task | None = None
        self._first_poll = asyncio.Event()

    # -- replica availability ------------------------------------------------------
    async def _watch_replicas(self) -> None:
        """Keep Serve's view of every deployment (status, message, replica states) and the replicas' reports.

        /health and the availability checks answer from this view at once: asking
        a replica inline could wait as long as the replica takes to die.
        """
        from ray import serve

        last_reports = 0.0
        reports: asyncio.Task | None = None
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                deployments: dict[str, DeploymentView] = {}
                for app_name, app in status.applications.items():
                    for name, dep in app.deployments.items():
                        deployments[f"{app_name}/{name}"] = DeploymentView(
                            status=str(getattr(dep.status, "value", dep.status)),
                            message=dep.message or "",
                            replicas={str(getattr(k, "value", k)): int(v) for k, v in dep.replica_states.items()},
                        )
                self._deployments = deployments
                self._first_poll.set()
            except Exception:  # controller briefly unreachable: keep the last view
                logger.debug("replica status poll failed", exc_info=True)
            # Also at once when a model just got a running replica, so /health names where it runs.
            unreported = any(m not in self._reports and self._replicas(m, "RUNNING")
                             for m in self._default_serve_handles)
            due = unreported or time.monotonic() - last_reports >= REPORT_POLL_S
            # In a task of its own: a slow replica must not slow the replica-state polls.
            if due and (reports is None or reports.done()):
                last_reports = time.monotonic()
                reports = asyncio.get_running_loop().create_task(self._refresh_reports())
            await asyncio.sleep(REPLICA_POLL_S)

    async def _refresh_reports(self) -> None:
        """Where each model's replica runs and what kernels its workers patched (for /health)."""
        async def one(model_id: str, handle: Any) -> None:
            if not self._replicas(model_id, "RUNNING"):
                self._reports.pop(model_id, None)
                return
            try:
                self._reports[model_id] = await asyncio.wait_for(handle.fleet_status.remote(), timeout=REPORT_POLL_S)
            except Exception:
                logger.debug("fleet_status of %s failed", model_id, exc_info=True)

        await asyncio.gather(*(one(m, h) for m, h in self._default_serve_handles.items()))

    async def _ensure_watcher(self) -> None:
        """Start the watcher on first use and give its first poll a moment, so a first /health is not blind."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_replicas())
        if not self._first_poll.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._first_poll.wait(), timeout=FIRST_POLL_WAIT_S)

    def _view(self, model_id: str | None) -> DeploymentView | None:
        handle = self._default_serve_handles.get(model_id or "")
        if handle is None:
            return None
        return self._deployments.get(f"{handle.app_name}/{handle.deployment_name}")

    def model_state(self, model_id: str) -> dict[str, Any]:
        """``{state, reason, running_replicas}`` of one model, from the last poll."""
        view = self._view(model_id)
        if view is None:
            return {"state": "starting", "reason": "waiting for Serve's first status", "running_replicas": 0}
        running = sum(view.replicas.get(s, 0) for s in SERVING_STATES)
        if view.status == "DEPLOY_FAILED":
            state, reason = "failed", failure_reason(view.message)
        elif running == 0 and view.replicas.get("STARTING", 0):
            state, reason = "starting", "the replica's engine is starting"
        elif running == 0:
            state, reason = "no_replica", failure_reason(view.message) or "no replica is running"
        elif view.status == "HEALTHY":
            state, reason = "healthy", ""
        else:
            state, reason = "degraded", failure_reason(view.message) or f"deployment is {view.status}"
        return {"state": state, "reason": reason, "running_replicas": running}

    def _replicas(self, model_id: str | None, *states: str) -> int | None:
        """Replicas of the model's deployment in ``states``; None when unknown (never fail on doubt)."""
        view = self._view(model_id)
        if view is None:
            return None
        return sum(view.replicas.get(s, 0) for s in states)

    async def _bounded(self, call, body: Any, request: Request, model_id: str | None, deadline: float) -> Response:
        """Await ``call`` until it answers, the deadline passes, or no replica could be serving it."""
        task = asyncio.ensure_future(call(body, request))
        try:
            while True:
                wait_s = max(0.0, min(REPLICA_POLL_S, deadline - time.monotonic()))
                done, _ = await asyncio.wait({task}, timeout=wait_s)
                if done:
                    return task.result()
                if time.monotonic() >= deadline:
                    raise _Timeout()
                # No replica running or draining: the request can only be queued in the router.
                if self._replicas(model_id, *SERVING_STATES, "STOPPING") == 0:
                    raise _NoReplica()
        finally:
            if not task.done():
                task.cancel()

    # -- validation -----------------------------------------------------------------
    async def _check_chat(self, body: Any) -> None:
        """Limits, message shape and images of a chat request; http(s) images become data: URLs."""
        model = await self._get_model_id(body.model)
        await check_chat(body, self._endpoint, self._input_limits.get(model, {}), self._fetcher, model)

    # -- routing with retries ------------------------------------------------------------
    def _unavailable(self, why: str) -> Response:
        self.counters["unavailable"] += 1
        return _error(503, f"no replica of the model could take the request ({why}); retry shortly",
                      "ServiceUnavailable", headers={"Retry-After": str(RETRY_AFTER_S)})

    async def _serve(self, call, body: Any, request: Request) -> Response:
        self.counters["requests"] += 1
        await self._ensure_watcher()
        deadline = time.monotonic() + self._request_timeout_s
        model_id = getattr(body, "model", None)
        attempt = 0
        while True:
            if self._replicas(model_id, *SERVING_STATES) == 0:
                # Starting a vLLM replica takes minutes: waiting here would be the hang.
                return self._unavailable("no running replica")
            try:
                return await self._bounded(call, body, request, model_id, deadline)
            except HTTPException:
                raise
            except _NoReplica:
                return self._unavailable("the model lost its last replica")
            except _Timeout:
                self.counters["timed_out"] += 1
                return _error(504, f"no answer within request_timeout_s={self._request_timeout_s:g}",
                              "GatewayTimeout")
            except Exception as exc:
                if not _is_retryable(exc):
                    raise
                attempt += 1
                if attempt > self._retry_attempts or time.monotonic() > deadline:
                    return self._unavailable(type(exc).__name__)
                self.counters["retried"] += 1
                logger.warning("retrying request after %s (attempt %d)", type(exc).__name__, attempt)
                await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))

    def _rejected(self, rej: RequestRejected) -> Response:
        self.counters["rejected"] += 1
        return _error(rej.code, rej.message, rej.err_type)

    async def _admitted(self, call, body: Any, request: Request) -> Response:
        """``_serve`` within the per-model in-flight bound; engine errors become short client errors."""
        model = str(getattr(body, "model", None) or "")
        if not self._in_flight.try_enter(model):
            self.counters["queue_full"] += 1
            return _error(503, f"model {model!r} has {self._in_flight.bound} requests in flight, the most this "
                               "endpoint queues (endpoint.limits.max_queued_requests); retry shortly",
                          "ServiceUnavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
        held = True
        try:
            response = await self._serve(call, body, request)
            if isinstance(response, StreamingResponse):
                # The request stays in flight until its last chunk went out.
                response.body_iterator = self._counted(response.body_iterator, model)
                held = False
            return response
        except OpenAIHTTPException as exc:
            return _error(exc.status_code, client_message(exc.message, exc.status_code), exc.type)
        finally:
            if held:
                self._in_flight.leave(model)

    async def _counted(self, chunks, model: str):
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self._in_flight.leave(model)

    async def chat(self, body: ChatRequest, request: Request) -> Response:  # type: ignore[override]
        try:
            await self._check_chat(body)
        except RequestRejected as rej:
            return self._rejected(rej)
        except OpenAIHTTPException as exc:  # unknown model
            return _error(exc.status_code, client_message(exc.message, exc.status_code), exc.type)
        return await self._admitted(super().chat, body, request)

    async def completions(self, body: CompletionsRequest, request: Request) -> Response:  # type: ignore[override]
        try:
            apply_limits(body, self._endpoint.limits, chat=False)
        except RequestRejected as rej:
            return self._rejected(rej)
        return await self._admitted(super().completions, body, request)

    # -- health and models ------------------------------------------------------------
    async def health(self) -> Response:
        """200 when every model serves (``healthy`` or ``degraded``), else 503; answered from the watcher's view.

        Never waits on a replica: a starting, failed or dying one would hold the
        answer for as long as it takes to time out.
        """
        await self._ensure_watcher()
        models = {}
        for model_id in self._default_serve_handles:
            models[model_id] = {**self.model_state(model_id), **self._reports.get(model_id, {})}
        serving = all(m["state"] in ("healthy", "degraded") for m in models.values())
        if serving:
            status = "degraded" if any(m["state"] == "degraded" for m in models.values()) else "ok"
        else:
            status = "unavailable"
        content = {"status": status, "models": models, "ingress": self.counters}
        headers = None if serving else {"Retry-After": str(RETRY_AFTER_S)}
        return JSONResponse(status_code=200 if serving else 503, content=content, headers=headers)

    async def model(self, model_id: str) -> Any:
        """The model card plus whether the model has a running replica (``metadata.fleetserve``)."""
        card = await super().model(model_id)
        if card is None or model_id not in self._default_serve_handles:
            return card
        await self._ensure_watcher()
        return card.model_copy(update={"metadata": {**card.metadata, "fleetserve": self.model_state(model_id)}})


@dataclasses.dataclass
class DeploymentView:
    """One deployment as Serve's controller last reported it."""

    status: str
    message: str
    replicas: dict[str, int]


FLEET_ENDPOINTS = {
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "health": lambda app: app.get("/health"),
}
