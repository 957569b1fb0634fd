"""Who is calling. API keys (``user:key``) from the settings, sent as
``Authorization: Bearer <key>`` or in the seed's ``token`` header.

With no keys configured (only allowed on loopback, see :func:`check_exposure`) every
caller is the user ``default``. Users never come from a trusted ``username`` header:
the seed put that header straight into object keys.
"""

from __future__ import annotations

import hmac
import ipaddress
import re

from aiohttp import web

from services.gateway.errors import ApiError
from services.gateway.settings import GatewaySettings

DEFAULT_USER = "default"
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_api_keys(entries: list[str]) -> dict[str, str]:
    """``["alice:s3cret"]`` → ``{"s3cret": "alice"}``; refuses malformed entries."""
    keys: dict[str, str] = {}
    for entry in entries:
        user, sep, key = entry.partition(":")
        if not sep or not USER_RE.fullmatch(user) or len(key) < 16:
            raise SystemExit(
                "SDSWARM_API_KEYS entries must be user:key with a user name of letters, digits,"
                " '_', '.', '-' and a key of at least 16 characters"
            )
        keys[key] = user
    return keys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: GatewaySettings) -> None:
    """Auth is on whenever the gateway listens beyond loopback: refuse to start otherwise."""
    if not settings.api_keys and not is_loopback(settings.host):
        raise SystemExit(
            f"refusing to listen on {settings.host} without authentication: set SDSWARM_API_KEYS"
            " (user:key,...) or listen on 127.0.0.1"
        )


def caller(request: web.Request, keys: dict[str, str]) -> str:
    if not keys:
        return DEFAULT_USER
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    token = token or request.headers.get("token", "")
    for key, user in keys.items():
        if token and hmac.compare_digest(key, token):
            return user
    raise ApiError(
        401, "unauthorized", "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"}
    )
