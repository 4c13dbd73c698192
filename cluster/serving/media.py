"""Image inputs: the ingress fetches http(s) images itself, so vLLM never fetches a client's URL.

vLLM would fetch ``image_url`` URLs from inside a replica with no address
policy: any client could make it probe loopback services, the private network
or a cloud metadata endpoint, and a server that never answers tied a request
up for minutes. Here each http(s) image is fetched by the ingress under the
spec's :class:`cluster.serving.spec.MediaPolicy`, checked, and handed to the replica
as a ``data:`` URL:

* the host is resolved once, **every** resolved address is checked (loopback,
  private, link-local, multicast, reserved, unspecified and cloud-metadata
  addresses are denied unless ``allowed_networks`` lists them; metadata
  addresses always), and the connection goes to the checked address with the
  original ``Host`` header and TLS SNI, so a second DNS answer cannot swap it;
* ``allowed_domains`` (when set) restricts the hosts;
* redirects are followed by hand, each hop checked again, at most
  ``max_redirects``;
* one total deadline (``fetch_timeout_s``) covers DNS, connect, redirects and
  the body; the body is counted while it streams against the model's
  ``max_image_bytes``;
* the pixel count is read from the image header and checked before anything
  decodes the image (a 12000 x 12000 PNG is a few hundred KB).

Every denial gives the same text whatever the port or path, so the answers
cannot be used to map internal services. httpx does the HTTP; no library
offers the address pinning, so that part is written here.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import io
import ipaddress
import socket
from typing import Any
from urllib.parse import urljoin

from cluster.serving.limits import RequestRejected
from cluster.serving.spec import MediaPolicy

#: Cloud metadata services: denied even when allowed_networks covers them.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200",
))
DENIED = "its host is not a public address this endpoint may fetch from"


def _embedded(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list:
    """The IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo): each is checked too."""
    if ip.version != 6:
        return []
    out = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo:
        out += list(ip.teredo)
    return out


def address_allowed(ip, allowed_networks: list[ipaddress._BaseNetwork]) -> bool:
    """True for a public unicast address, or one inside an explicitly allowed network."""
    for addr in [ip, *_embedded(ip)]:
        if addr in METADATA_ADDRESSES:
            return False
        if any(addr.version == net.version and addr in net for net in allowed_networks):
            continue
        if not addr.is_global or addr.is_multicast or addr.is_reserved or addr.is_unspecified:
            return False
    return True


def domain_allowed(host: str, allowed_domains: list[str]) -> bool:
    if not allowed_domains:
        return True
    host = host.lower().rstrip(".")
    return any(host == d or (d.startswith("*.") and fnmatch.fnmatch(host, d)) for d in allowed_domains)


class ImageFetcher:
    """Fetches http(s) images under one :class:`MediaPolicy` (see module docstring)."""

    def __init__(self, policy: MediaPolicy):
        self.policy = policy
        self.networks = [ipaddress.ip_network(c, strict=False) for c in policy.allowed_networks]

    async def _resolve(self, host: str, port: int) -> list:
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            return [literal]
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return []
        seen: list = []
        for info in infos:
            ip = ipaddress.ip_address(info[4][0].split("%")[0])
            if ip not in seen:
                seen.append(ip)
        return seen

    async def _fetch(self, url: str, index: int, max_bytes: int) -> bytes:
        import httpx

        for _hop in range(self.policy.max_redirects + 1):
            try:
                parsed = httpx.URL(url)
            except httpx.InvalidURL:
                raise RequestRejected(400, f"image {index}: the URL is not valid") from None
            if parsed.scheme not in ("http", "https") or not parsed.host:
                raise RequestRejected(400, f"image {index}: only http(s):// and data: image URLs are accepted")
            host = parsed.host
            if not domain_allowed(host, self.policy.allowed_domains):
                raise RequestRejected(400, f"image {index}: its host is not in this endpoint's allowed_domains")
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            addresses = await self._resolve(host, port)
            if not addresses:
                raise RequestRejected(400, f"image {index}: its host does not resolve")
            if not all(address_allowed(ip, self.networks) for ip in addresses):
                raise RequestRejected(400, f"image {index}: {DENIED}")
            pinned = parsed.copy_with(host=str(addresses[0]))
            extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
            headers = {"Host": parsed.netloc.decode("ascii"), "Accept": "image/*"}
            # A fresh client per image: a pooled connection verified for one
            # name must never carry a request for another name on the same IP.
            async with httpx.AsyncClient(trust_env=False, follow_redirects=False) as client:
                request = client.build_request("GET", pinned, headers=headers, extensions=extensions)
                try:
                    response = await client.send(request, stream=True)
                except httpx.HTTPError as exc:
                    raise RequestRejected(400, f"image {index}: the fetch failed ({type(exc).__name__})") from None
                try:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        url = urljoin(str(parsed), location)
                        continue
                    if response.status_code != 200:
                        raise RequestRejected(400, f"image {index}: the server answered HTTP {response.status_code}")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise RequestRejected(413, f"image {index}: larger than the {max_bytes} byte limit",
                                              "RequestTooLarge")
                    data = bytearray()
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > max_bytes:
                            raise RequestRejected(413, f"image {index}: larger than the {max_bytes} byte limit",
                                                  "RequestTooLarge")
                    return bytes(data)
                except httpx.HTTPError as exc:
                    raise RequestRejected(400, f"image {index}: the fetch failed ({type(exc).__name__})") from None
                finally:
                    await response.aclose()
        raise RequestRejected(400, f"image {index}: more than {self.policy.max_redirects} redirects")

    async def fetch(self, url: str, index: int, max_bytes: int) -> bytes:
        """The image's bytes, within one total deadline; :class:`RequestRejected` otherwise."""
        try:
            async with asyncio.timeout(self.policy.fetch_timeout_s):
                return await self._fetch(url, index, max_bytes)
        except TimeoutError:
            raise RequestRejected(
                400, f"image {index}: the fetch did not complete within {self.policy.fetch_timeout_s:g} s") from None


def check_image_bytes(raw: bytes, index: int, max_pixels: int) -> str:
    """Check an image's pixel count from its header, then its structure; returns its MIME type.

    ``Image.open`` reads only the header, so the size is known before any
    decoding; ``verify`` then walks the data without building the pixels.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise RequestRejected(400, f"image {index}: {width} x {height} pixels is over this endpoint's "
                                           f"limit of {max_pixels} (endpoint.media.max_image_pixels)")
            fmt = img.format
            img.verify()
    except RequestRejected:
        raise
    except Image.DecompressionBombError:
        raise RequestRejected(400, f"image {index}: over this endpoint's pixel limit of {max_pixels} "
                                   "(endpoint.media.max_image_pixels)") from None
    except Exception as exc:  # PIL raises many types for bad images
        raise RequestRejected(400, f"image {index}: cannot decode the image ({type(exc).__name__})") from None
    return Image.MIME.get(fmt or "", "image/png")


def image_parts(body: Any) -> list[dict]:
    """Every ``image_url`` part dict of a chat request, in order (mutable: URLs are rewritten in place)."""
    parts: list[dict] = []
    for message in getattr(body, "messages", None) or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts += [p for p in content if isinstance(p, dict) and p.get("type") == "image_url"]
    return parts


def media_url_problem(body: Any) -> str | None:
    """Non-image media (video, audio) must come as data: URLs: the ingress fetches images only."""
    for message in getattr(body, "messages", None) or []:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("video_url", "audio_url"):
                continue
            inner = part.get(part["type"]) or {}
            url = inner.get("url", "") if isinstance(inner, dict) else str(inner)
            if not str(url).startswith("data:"):
                return f"{part['type']} parts must be data: URLs; this endpoint does not fetch them"
    return None


def to_data_url(raw: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"
