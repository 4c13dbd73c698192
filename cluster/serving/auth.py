"""API keys for the OpenAI endpoint: loaded where Serve builds the app, checked per request.

Keys come from an environment variable or a file named in the spec's
``endpoint:`` block, never from the YAML itself. :func:`load_key_digests`
runs in the app builder (``build_app``): for ``serve run``/``serve deploy`` of
a config file that is Serve's build task inside the cluster (normally on the
head node, with the environment of ``ray start`` there). Only SHA-256 digests
leave the builder, so the keys themselves are never stored in Serve's
checkpoint or sent to replicas.

:class:`ApiKeyMiddleware` is a plain ASGI middleware rather than a FastAPI
dependency so it guards every route the ingress app has (``/v1/*``, FastAPI's
``/docs`` and ``/openapi.json``) except ``/health``, and answers before the
body is read.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from cluster.errors import ConfigError
from cluster.serving.spec import EndpointSpec

#: Paths that stay open without a key (relative to the app's route prefix).
OPEN_PATHS = frozenset({"/health"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _split_keys(text: str) -> list[str]:
    keys = []
    for line in text.replace(",", "\n").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


def load_key_digests(endpoint: EndpointSpec, source: str | None = None, key: str = "args.endpoint") -> tuple[bytes, ...]:
    """SHA-256 digests of the configured API keys; () when none are configured.

    A configured source that is missing, empty or readable by every user on
    the host is a :class:`ConfigError`: serving open because a key file was
    mistyped would be the silent failure this exists to prevent. Error texts
    name the variable or path, never a key.
    """
    keys: list[str] = []
    if endpoint.api_keys_env:
        value = os.environ.get(endpoint.api_keys_env, "")
        if not _split_keys(value):
            raise ConfigError(
                source, f"{key}.api_keys_env",
                f"environment variable {endpoint.api_keys_env} is not set or holds no key where the app is built",
                f"export {endpoint.api_keys_env}=<key>[,<key>...] in the environment of `ray start` on the head node",
            )
        keys += _split_keys(value)
    if endpoint.api_keys_file:
        path = Path(endpoint.api_keys_file)
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(
                source, f"{key}.api_keys_file", f"cannot read the key file {path}: {exc.strerror}",
                "create it on the node where Serve builds the app (the head), one key per line, mode 0600",
            ) from None
        if mode & stat.S_IROTH:
            raise ConfigError(
                source, f"{key}.api_keys_file", f"the key file {path} is readable by every user on the host",
                f"chmod 600 {path}",
            )
        if not _split_keys(text):
            raise ConfigError(source, f"{key}.api_keys_file", f"the key file {path} holds no key",
                              "write one key per line")
        keys += _split_keys(text)
    return tuple(_digest(k) for k in keys)


def key_matches(presented: str, digests: tuple[bytes, ...]) -> bool:
    """Constant-time check of a presented key against every configured digest.

    Comparing digests (fixed length) with ``hmac.compare_digest`` and never
    stopping at the first match keeps the time independent of the key and of
    which configured key matched.
    """
    candidate = _digest(presented)
    found = False
    for digest in digests:
        found |= hmac.compare_digest(candidate, digest)
    return found


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


async def send_json_error(send, code: int, message: str, err_type: str, extra_headers: dict[str, str] | None = None) -> None:
    """An OpenAI-shape error sent straight from ASGI middleware (before any route runs)."""
    import json

    body = json.dumps({"object": "error", "message": message, "type": err_type, "code": code,
                       "error": {"message": message, "type": err_type, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def relative_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


class ApiKeyMiddleware:
    """401 (OpenAI error shape) unless ``Authorization: Bearer <key>`` matches a configured key."""

    def __init__(self, app, digests: tuple[bytes, ...]):
        self.app = app
        self.digests = digests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.digests or relative_path(scope) in OPEN_PATHS:
            return await self.app(scope, receive, send)
        # CORS preflights carry no credentials by design; they reveal nothing.
        if scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        token = bearer_token(scope.get("headers", []))
        if token is None:
            return await send_json_error(send, 401, "missing API key: send `Authorization: Bearer <key>`",
                                         "AuthenticationError", {"WWW-Authenticate": "Bearer"})
        if not key_matches(token, self.digests):
            return await send_json_error(send, 401, "invalid API key", "AuthenticationError",
                                         {"WWW-Authenticate": "Bearer"})
        return await self.app(scope, receive, send)
