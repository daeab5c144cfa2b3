"""URLs from configuration, checked before anything connects to them."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

# A host name: dot-separated labels of letters, digits, inner hyphens and underscores (not DNS,
# but container and internal names have them).
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def check_http_url(url: str, what: str) -> None:
    """ValueError naming `what` unless `url` is http(s) with a host name or an IP address (a
    template's `<prometheus>` left unfilled is not one) and a valid port, if any."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{what}: expected an http:// or https:// URL (got {url!r})")
    host = parts.hostname
    if not host:
        raise ValueError(f"{what}: no host in {url!r}")
    if not _HOST.fullmatch(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{what}: {host!r} is not a host name or an IP address") from None
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number in range)
    except ValueError:
        raise ValueError(f"{what}: the port in {url!r} is not a number from 0 to 65535") from None


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, as a URL or a listen address gives it) is this
    machine only: `localhost` or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
