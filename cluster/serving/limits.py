"""Request limits the ingress enforces before a replica sees a request.

* :class:`BodyLimitMiddleware` -- 413 for a body over ``limits.max_body_bytes``,
  counted while it streams in (a missing or false Content-Length does not help).
* :func:`apply_limits` -- ``n``/``best_of`` and ``max_tokens`` against the spec
  (a request that names no ``max_tokens`` gets the cap: omitting the field
  must not buy a generation up to the context length), and the message shape
  vLLM's chat template code assumes (a dict with a ``role``), each a 400 with a
  short reason instead of a 500 from deep inside the replica.
* :class:`ChatRequest`, :class:`CompletionsRequest` -- the request models the
  routes parse with: an exception from vLLM's own validators on a malformed
  field is a 4xx, not a 500.
* :class:`InFlight` -- a per-model bound on requests the ingress holds; a full
  queue is answered 503 + Retry-After at once instead of an unbounded wait.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from pydantic import ValidationError, model_validator
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from cluster.serving.auth import send_json_error
from cluster.serving.spec import RequestLimits

logger = logging.getLogger("ray.serve")

#: Seconds a 503 tells the client to wait before retrying (both data paths).
RETRY_AFTER_S = 5

#: Roles the OpenAI chat API defines (vLLM's templates index ``message["role"]``).
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _malformed_is_client_error(cls, data: Any, handler: Any) -> Any:
    """Turn any exception a request model's own validators raise into a validation error (a 4xx).

    vLLM's validators assume well-typed input and raise AttributeError/TypeError on
    other shapes (``"structured_outputs": true`` -> ``bool.get``), which FastAPI
    would answer with a 500. Correct bodies pass through untouched.
    """
    try:
        return handler(data)
    except ValidationError:
        raise
    except Exception as exc:
        raise ValueError(f"the request body is malformed ({type(exc).__name__}: a field has the wrong type)") from None


class ChatRequest(ChatCompletionRequest):
    """Ray Serve LLM's chat request, with malformed bodies answered as the client's error."""

    _client_errors = model_validator(mode="wrap")(_malformed_is_client_error)


class CompletionsRequest(CompletionRequest):
    """Ray Serve LLM's completion request, with malformed bodies answered as the client's error."""

    _client_errors = model_validator(mode="wrap")(_malformed_is_client_error)


class RequestRejected(Exception):
    """A request that breaks a documented limit; becomes a 4xx in the OpenAI error shape."""

    def __init__(self, code: int, message: str, err_type: str = "BadRequestError"):
        super().__init__(message)
        self.code, self.message, self.err_type = code, message, err_type


class BodyLimitMiddleware:
    """Reads at most ``max_bytes`` of a request body; one byte more is answered 413.

    The body is buffered here and replayed to the app: the JSON parser needs all
    of it anyway, and buffering is what lets the 413 go out before any route ran.
    A body that is JSON but not an object (``[]``, ``"x"``, ``1``) is answered 400
    here: vLLM's request models call ``data.get`` in a before-validator and
    would turn it into a 500.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_large = (f"request body larger than {self.max_bytes} bytes "
                     "(endpoint.limits.max_body_bytes)")
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await send_json_error(send, 413, too_large, "RequestTooLarge")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await send_json_error(send, 413, too_large, "RequestTooLarge")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        head = body.lstrip()[:1]
        if head and head != b"{" and _is_json(scope):
            return await send_json_error(send, 400, "the request body must be a JSON object", "BadRequestError")
        return await self.app(scope, replaying(body, receive), send)


def replaying(body: bytes, receive):
    """An ASGI ``receive`` that gives the app ``body`` (already read) first, then the client's messages."""
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _is_json(scope) -> bool:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return True  # FastAPI parses a body without a content type as JSON too


class HideServerErrorsMiddleware:
    """A 500 never carries exception text to the client.

    Ray Serve LLM's error handler puts ``str(exception)`` into the message; for
    a replica's exception that is a remote traceback with paths, node IPs and
    actor ids. The body of any 500 is replaced by a generic OpenAI error that
    keeps only the request id (the full error is in the ingress's log).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = hiding = False
        request_id = ""

        async def guarded_send(message):
            nonlocal started, hiding, request_id
            if message["type"] == "http.response.start":
                started = True
                if message["status"] == 500:
                    hiding = True
                    request_id = dict(message.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")[:64]
                    return
            if hiding:
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    suffix = f" (request id {request_id})" if request_id else ""
                    await send_json_error(send, 500, "internal error while serving the request" + suffix,
                                          "InternalServerError")
                return
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception:
            logger.exception("unhandled error while serving the request")
            if not started or hiding:
                await send_json_error(send, 500, "internal error while serving the request", "InternalServerError")


def _message_problem(i: int, message: Any) -> str | None:
    if not isinstance(message, dict):
        return f"messages[{i}] must be an object with a role and content"
    role = message.get("role")
    if not isinstance(role, str):
        return f"messages[{i}] has no role; give one of {', '.join(sorted(CHAT_ROLES))}"
    if role not in CHAT_ROLES:
        return f"messages[{i}].role {role[:40]!r} is not one of {', '.join(sorted(CHAT_ROLES))}"
    return None


TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def apply_limits(body: Any, limits: RequestLimits, chat: bool) -> None:
    """Raise :class:`RequestRejected` for a request over a limit or of a shape no replica can serve;
    give a request without ``max_tokens``/``max_completion_tokens`` the endpoint's cap."""
    for field in ("n", "best_of"):
        value = getattr(body, field, None)
        if value is None:
            continue
        if value < 1:
            raise RequestRejected(400, f"`{field}` must be at least 1, got {value}")
        if value > limits.max_n:
            raise RequestRejected(400, f"`{field}` = {value} is over this endpoint's limit of {limits.max_n} "
                                       "(endpoint.limits.max_n)")
    # A library default (16 for completions; vLLM marks it as set) is not the client's error: it is
    # lowered to the cap like an absent value. An explicit value equal to it is treated the same.
    fields = type(body).model_fields
    written = [f for f in TOKEN_FIELDS if f in fields and getattr(body, f) not in (None, fields[f].default)]
    for field in written:
        value = getattr(body, field)
        if value < 1:
            raise RequestRejected(400, f"`{field}` must be at least 1, got {value}")
        if limits.max_tokens is not None and value > limits.max_tokens:
            raise RequestRejected(400, f"`{field}` = {value} is over this endpoint's limit of {limits.max_tokens} "
                                       "(endpoint.limits.max_tokens)")
    if limits.max_tokens is not None and not written:
        body.max_tokens = min(limits.max_tokens, body.max_tokens or limits.max_tokens)
    if chat:
        messages = list(getattr(body, "messages", None) or [])
        if not messages:
            raise RequestRejected(400, "`messages` must hold at least one message")
        for i, message in enumerate(messages):
            problem = _message_problem(i, message)
            if problem:
                raise RequestRejected(400, problem)


class InFlight:
    """Requests the ingress holds per model, against ``limits.max_queued_requests``.

    Counted per ingress replica (each holds its own queue). A streamed response
    stays counted until its last chunk went out.
    """

    def __init__(self, bound: int):
        self.bound = bound
        self.counts: Counter[str] = Counter()

    def try_enter(self, model: str) -> bool:
        if self.counts[model] >= self.bound:
            return False
        self.counts[model] += 1
        return True

    def leave(self, model: str) -> None:
        self.counts[model] -= 1
        if self.counts[model] <= 0:
            del self.counts[model]
