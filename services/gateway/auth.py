"""Who is calling.

Credentials: a session token from ``POST /login`` or an API key from
``sdswarm users key``, sent as ``Authorization: Bearer <secret>``, in the seed's
``token`` header, or as the password of HTTP Basic auth with the user's name (A1111
clients' ``--api-auth``); static ``user:key`` pairs from ``SDSWARM_API_KEYS`` work too.

Authentication is on whenever the gateway listens beyond loopback (or with
``SDSWARM_AUTH=true``). With it off — loopback only, and the gateway says so at start —
every caller is the user ``default``. Users never come from a ``username`` header: the
seed put that header straight into object keys.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from services.gateway.errors import ApiError, too_many
from services.gateway.openapi import LoginResponse, respond
from services.gateway.resources import Resources, resources
from services.gateway.settings import GatewaySettings
from services.gateway.validation import read_json

log = logging.getLogger(__name__)
DEFAULT_USER = "default"
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_api_keys(entries: list[str]) -> dict[str, str]:
    """``["alice:s3cret…"]`` → ``{"s3cret…": "alice"}``; refuses malformed entries."""
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


def auth_enabled(settings: GatewaySettings) -> bool:
    return settings.auth or bool(settings.api_keys) or not is_loopback(settings.host)


def announce(settings: GatewaySettings) -> None:
    if auth_enabled(settings):
        log.info("authentication is on: every request needs a token or an API key")
    else:
        log.warning(
            "authentication is off (listening on %s only): every caller is the user %r",
            settings.host,
            DEFAULT_USER,
        )


def presented_credentials(request: web.Request) -> tuple[str, str | None]:
    """The secret the caller presents, and the user name it claims (HTTP Basic only).

    ``Authorization: Bearer <secret>``, the seed's ``token`` header, or
    ``Authorization: Basic`` with the user name and an API key or token as the password:
    what A1111 clients send for a webui started with ``--api-auth``.
    """
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return "", None
        user, sep, secret = decoded.partition(":")
        return (secret, user) if sep and secret else ("", None)
    return request.headers.get("token", "").strip(), None


async def caller(request: web.Request, res: Resources) -> str:
    if not res.auth:
        return DEFAULT_USER
    secret, claimed = presented_credentials(request)
    user = await _resolve(res, secret) if secret else None
    if user is not None and (claimed is None or claimed.lower() == user.lower()):
        return user
    raise ApiError(
        401,
        "unauthorized",
        "missing, invalid or expired token or API key",
        headers={"WWW-Authenticate": 'Bearer, Basic realm="sdswarm"'},
    )


async def _resolve(res: Resources, secret: str) -> str | None:
    for key, user in res.api_keys.items():
        if hmac.compare_digest(key, secret):
            return user
    return await res.users.resolve(secret)


async def login(request: web.Request) -> web.StreamResponse:
    """The seed's ``POST /login``: ``{userName, password}`` (field names in any case).

    Throttled per user name and per client address (``login_*`` settings): attempts are
    counted before the (slow, threaded) Argon2 check, so guesses beyond the limit cost
    nothing and are refused with 429 even when the password is right.
    """
    res = resources(request)
    body = await read_json(request)
    fields = {str(k).lower(): v for k, v in body.items()} if isinstance(body, dict) else {}
    name, password = fields.get("username"), fields.get("password")
    if not isinstance(name, str) or not isinstance(password, str):
        raise ApiError(
            422,
            "invalid_field",
            "`userName` and `password` are required strings",
            field="userName" if not isinstance(name, str) else "password",
        )
    settings = res.settings
    # Names no user can have share one counter: they cannot be used to grow the store.
    user_key = f"user:{name if USER_RE.fullmatch(name) else '?'}"
    address_key = f"addr:{request.remote or '?'}"
    refusal = await res.logins.attempt(
        {
            user_key: settings.login_max_failures_per_user,
            address_key: settings.login_max_attempts_per_address,
        },
        settings.login_window_s,
    )
    if refusal is not None:
        raise too_many("login_throttled", refusal.reason, refusal.retry_after_s)
    async with res.password_checks:
        verified = await res.users.verify_password(name, password)
    if not verified:
        raise ApiError(401, "login_failed", "unknown user or wrong password")
    await res.logins.succeeded(user_key, address_key)
    token = await res.users.login(name, settings.session_ttl_s)
    return respond(LoginResponse(token=token, userName=name, message="login success"))


async def caller_is_admin(request: web.Request, res: Resources) -> tuple[str, bool]:
    """The caller, and whether they are an administrator (``SDSWARM_ADMINS``); with
    authentication off (a loopback-only gateway) everyone is."""
    user = await caller(request, res)
    return user, not res.auth or user in res.settings.admins


async def require_admin(request: web.Request, what: str) -> tuple[Resources, str]:
    """The caller, who must be an administrator to do ``what``."""
    res = resources(request)
    user, admin = await caller_is_admin(request, res)
    if not admin:
        raise ApiError(403, "forbidden", f"only administrators (SDSWARM_ADMINS) {what}")
    return res, user


def server_paths(res: Resources, admin: bool) -> Callable[[str], str]:
    """How the caller sees text that may hold server paths (a model's file, an error
    about it): administrators as it is; anyone else with the models folder's and the
    object folder's absolute locations cut off, so a path reads ``Lora/ink.safetensors``
    (A1111 shows absolute paths; they tell a client the server's layout)."""
    if admin:
        return str
    roots = [
        str(Path(folder).resolve()) for folder in (res.settings.models_dir, res.settings.store_dir)
    ]

    def shown(text: str) -> str:
        for root in roots:
            text = text.replace(root + os.sep, "").replace(root, ".")
        return text

    return shown
