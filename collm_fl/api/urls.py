"""Base URLs of OpenAI-compatible servers as users write them."""

from __future__ import annotations

from urllib.parse import urlsplit

from collm_fl.errors import ConfigError


def normalize_url(url: str, what: str = "replica URL") -> str:
    """A server's base URL without a trailing ``/`` or ``/v1`` (both spellings are accepted, as
    OpenAI clients take ``.../v1``); ConfigError naming ``what`` unless it is http(s)://host[:port]."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # out of range or not a number
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ConfigError(f"{what} must look like http://host:port, got {url!r}")
    return url
