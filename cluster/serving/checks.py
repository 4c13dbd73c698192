"""Checks of a request's content that no replica should pay for, shared by both data paths.

The ingress (:mod:`cluster.serving.ingress`) runs them on the parsed request before
routing it; on the direct data path (:mod:`cluster.serving.direct`) the replica runs
them in ASGI middleware before vLLM parses the body. Either way a bad request gets a
4xx with the reason, and http(s) images are fetched here under the media policy
(never by vLLM, which would reach any address) and handed on as ``data:`` URLs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

from ray.llm._internal.serve.core.ingress.utils import _sanitize_chat_completion_request

from cluster.serving.limits import RequestRejected, apply_limits
from cluster.serving.media import ImageFetcher, check_image_bytes, image_parts, media_url_problem, to_data_url
from cluster.serving.spec import EndpointSpec, MediaPolicy


def _image_urls(body: Any) -> list[Any]:
    """The URLs of every image input of a chat request, in order (None for inline PIL/embeds parts)."""
    urls: list[Any] = []
    for message in body.messages or []:
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
        if not isinstance(content, list):
            continue
        for part in content:
            part = part if isinstance(part, dict) else getattr(part, "model_dump", lambda: {})()
            if part.get("type") == "image_url":
                image = part.get("image_url") or {}
                urls.append(image.get("url", "") if isinstance(image, dict) else image)
            elif part.get("type") in ("image_pil", "image_embeds"):
                urls.append(None)
    return urls


def check_images(urls: list[Any], max_images: int | None, max_bytes: int, model: str,
                 max_pixels: int = MediaPolicy().max_image_pixels) -> None:
    """Reject what no replica could serve: too many images, other URL schemes, bad or huge data URLs.

    http(s) URLs pass here; the ingress fetches them (:mod:`cluster.serving.media`).
    """
    if max_images is not None and len(urls) > max_images:
        raise RequestRejected(
            400,
            f"too many images: the request has {len(urls)} and model {model!r} accepts at most "
            f"{max_images} per prompt (limit_mm_per_prompt.image)",
        )
    for i, url in enumerate(urls):
        if url is None:
            continue
        if not isinstance(url, str) or not url:
            raise RequestRejected(400, f"image {i}: image_url.url must be a non-empty string")
        if not url.startswith("data:"):
            if not url.startswith(("http://", "https://")):
                raise RequestRejected(400, f"image {i}: only http(s):// and data: image URLs are accepted")
            continue
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header or not header[5:].startswith("image/"):
            raise RequestRejected(400, f"image {i}: a data URL must look like data:image/<type>;base64,<data>")
        if len(payload) * 3 // 4 > max_bytes:
            raise RequestRejected(413, f"image {i}: larger than the {max_bytes} byte limit", "RequestTooLarge")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestRejected(400, f"image {i}: the data URL is not valid base64 ({exc})") from None
        check_image_bytes(raw, i, max_pixels)


def content_part_problem(body: Any) -> str | None:
    """Content parts vLLM would read differently from the checks here, refused rather than missed.

    vLLM 0.26 finds media by key in a part without a ``type`` or with a ``uuid``
    (``chat_utils._parse_chat_message_content_mm_part``) and takes Responses-style
    ``input_image`` parts: the image checks and the media policy, which go by
    ``type``, would not see those URLs, and vLLM would fetch them itself. A typed
    media part whose value is not an object would be a 500 deep in vLLM.
    """
    for m, message in enumerate(getattr(body, "messages", None) or []):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for p, part in enumerate(content):
            if not isinstance(part, dict):
                continue
            where, kind = f"messages[{m}].content[{p}]", part.get("type")
            if not isinstance(kind, str):
                return (f'{where} has no type: write each part as {{"type": "text", "text": ...}} or '
                        '{"type": "image_url", "image_url": {"url": ...}}')
            if part.get("uuid") is not None:
                return f"{where}: content parts with a uuid are not accepted by this endpoint"
            if kind == "input_image":
                return f'{where}: input_image parts are not accepted here; send {{"type": "image_url", ...}}'
            if kind in ("image_url", "video_url", "audio_url") and not isinstance(part.get(kind), dict):
                return f'{where}.{kind} must be an object: {{"url": ...}}'
    return None


async def check_chat(body: Any, endpoint: EndpointSpec, limits: dict[str, Any], fetcher: ImageFetcher,
                     model: str) -> None:
    """Limits, message shape and images of a chat request; http(s) images become data: URLs (in place).

    ``limits``: the model's ``max_images`` (``limit_mm_per_prompt.image``) and ``max_image_bytes``.
    """
    apply_limits(body, endpoint.limits, chat=True)
    # Message contents may still be pydantic's one-shot iterators: make them lists
    # before they are read here (Ray Serve LLM does the same before routing). Each
    # content part is validated only then: a malformed one is the client's error.
    try:
        _sanitize_chat_completion_request(body)
    except ValueError:
        raise RequestRejected(400, "a message's content parts are malformed: each part needs its type and "
                              'that field, e.g. {"type": "image_url", "image_url": {"url": "https://..."}}'
                              ) from None
    problem = content_part_problem(body) or media_url_problem(body)
    if problem:
        raise RequestRejected(400, problem)
    urls = _image_urls(body)
    if not urls:
        return
    max_bytes, max_pixels = limits.get("max_image_bytes", 20 << 20), endpoint.media.max_image_pixels
    # Decoding is CPU work: keep it off the event loop that serves other requests.
    await asyncio.to_thread(check_images, urls, limits.get("max_images"), max_bytes, model, max_pixels)
    remote = [(i, part) for i, part in enumerate(image_parts(body))
              if str((part.get("image_url") or {}).get("url", "")).startswith(("http://", "https://"))]
    if not remote:
        return
    fetched = await asyncio.gather(*(fetcher.fetch(part["image_url"]["url"], i, max_bytes) for i, part in remote))
    for (i, part), raw in zip(remote, fetched):
        mime = await asyncio.to_thread(check_image_bytes, raw, i, max_pixels)
        part["image_url"]["url"] = to_data_url(raw, mime)
