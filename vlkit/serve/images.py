"""Images of a request: base64 data URLs (always), remote URLs and local paths (only when the operator allows them).

Decoding is limited to PNG, JPEG, WebP and GIF (nothing reaches Pillow's other plugins, such as EPS through
Ghostscript), to the server's pixel budget, and to RGB. Remote URLs, when allowed, are fetched with every
hop checked, redirects included: http(s) only; the host in the allowlist when one is given; and a host that
is not allowlisted must resolve to public addresses only (no loopback, private, link-local, reserved or
multicast address), so that a URL cannot reach the server's own network. (A DNS answer that changes between
the check and the connection is not covered; an allowlist is the stronger setting.)
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field

from PIL import Image

from vlkit.data.images import to_rgb
from vlkit.serve.errors import APIError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


@dataclass
class ImagePolicy:
    max_pixels: int = 4096 * 4096
    max_bytes: int = 8 * 1024 * 1024
    allow_remote: bool = False
    allow_local: bool = False
    hosts: list[str] = field(default_factory=list)  # remote: only these hosts (empty: any public host)


def decode_image(url: str, policy: ImagePolicy, where: str) -> Image.Image:
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if ";base64" not in head or not head[5:].startswith("image/"):
            raise APIError(400, f"{where}: only base64 image data URLs (data:image/...;base64,...) are accepted",
                           param=where)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: invalid base64 in the image data URL", param=where) from None
        source = io.BytesIO(raw)
    elif url.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise APIError(400, f"{where}: remote image URLs are refused by this server (start it with "
                           "--allow-remote-images to fetch them); send a base64 data URL", param=where)
        source = fetch(url, policy, where)
    else:
        if not policy.allow_local:
            raise APIError(400, f"{where}: local image paths are refused by this server; send a base64 data URL",
                           param=where)
        source = url[7:] if url.startswith("file://") else url
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=FORMATS) as img:
                w, h = img.size
                if w * h > policy.max_pixels:
                    raise APIError(400, f"{where}: image is {w}x{h} = {w * h} pixels, over this server's limit of "
                                   f"{policy.max_pixels}", param=where)
                img.load()
                return to_rgb(img)
    except APIError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning, SyntaxError):
        raise APIError(400, f"{where}: not a readable image (PNG, JPEG, WebP or GIF)", param=where) from None


NAT64 = ipaddress.ip_network("64:ff9b::/96")


def public(address: str) -> bool:
    """A global address, and so is every IPv4 address an IPv6 one carries (mapped, compatible, 6to4, Teredo,
    NAT64): `::127.0.0.1` or `64:ff9b::7f00:1` must not pass for public."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if not ip.is_global:
        return False
    if ip.version == 6:
        inner = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if ip in NAT64 or ip.packed[:12] == bytes(12):
            inner.append(ipaddress.IPv4Address(ip.packed[-4:]))
        return all(v4.is_global for v4 in inner if v4 is not None)
    return True


def check_url(url: str, policy: ImagePolicy, where: str) -> None:
    """Refuse a URL this server must not fetch (see the module's docstring)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port that is not a number, an unclosed [IPv6 literal, ...
        raise APIError(400, f"{where}: {url[:80]!r} is not a valid URL", param=where) from None
    if parts.scheme not in ("http", "https") or not host:
        raise APIError(400, f"{where}: {url[:80]!r} is not an http(s) URL", param=where)
    if policy.hosts:
        if host not in {h.lower() for h in policy.hosts}:
            raise APIError(400, f"{where}: host {host!r} is not among this server's allowed image hosts", param=where)
        return
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError, ValueError):
        raise APIError(400, f"{where}: cannot resolve {host!r}", param=where) from None
    for a in addrs:
        if not public(a):
            raise APIError(400, f"{where}: {host!r} resolves to a non-public address ({a}); refused", param=where)


class _Checked(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: ImagePolicy, where: str):
        self.policy, self.where = policy, where

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(newurl, self.policy, self.where)  # every hop, not just the first
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, policy: ImagePolicy, where: str) -> io.BytesIO:
    check_url(url, policy, where)
    opener = urllib.request.build_opener(_Checked(policy, where))
    try:
        with opener.open(url, timeout=10) as resp:  # noqa: S310 (checked above, allowed by the operator)
            data = resp.read(policy.max_bytes + 1)
    except APIError:
        raise
    except (OSError, urllib.error.URLError, ValueError, UnicodeError) as e:
        raise APIError(400, f"{where}: could not fetch the image ({type(e).__name__})", param=where) from None
    if len(data) > policy.max_bytes:
        raise APIError(400, f"{where}: image larger than {policy.max_bytes} bytes", param=where)
    return io.BytesIO(data)
