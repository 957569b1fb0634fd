"""Users, login sessions and API keys (MongoDB).

Passwords are hashed with Argon2id (argon2-cffi). Session tokens and API keys are 256
random bits from ``secrets``; only their SHA-256 is stored, so a database leak does not
leak credentials. Sessions expire; API keys live until revoked. There is no default
user and no default password: users are created with ``sdswarm users add``. Argon2 is
slow on purpose (tens of ms of CPU): it runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import re
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.storage.mongo import Document

USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MIN_PASSWORD = 8
_hasher = PasswordHasher()


@functools.cache
def _unknown_user_hash() -> str:
    return _hasher.hash(secrets.token_urlsafe(32))


def _verify(stored: str | None, password: str) -> bool:
    """``stored`` None: an unknown user, verified against a hash nothing matches."""
    try:
        return _hasher.verify(stored or _unknown_user_hash(), password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


class UserError(ValueError):
    pass


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class UserStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.users: AsyncCollection[Document] = db["users"]
        self.credentials: AsyncCollection[Document] = db["credentials"]

    async def ensure_indexes(self) -> None:
        await self.credentials.create_index("user")

    async def add(self, name: str, password: str) -> None:
        if not USER_RE.fullmatch(name):
            raise UserError(
                "user names are 1-64 letters, digits, '_', '.', '-'"
                " and start with a letter or digit"
            )
        if len(password) < MIN_PASSWORD:
            raise UserError(f"passwords need at least {MIN_PASSWORD} characters")
        try:
            await self.users.insert_one(
                {
                    "_id": name,
                    "password": await asyncio.to_thread(_hasher.hash, password),
                    "created_at": dt.datetime.now(dt.UTC),
                }
            )
        except DuplicateKeyError as exc:
            raise UserError(f"user {name!r} exists") from exc

    async def remove(self, name: str) -> bool:
        await self.credentials.delete_many({"user": name})
        return (await self.users.delete_one({"_id": name})).deleted_count == 1

    async def names(self) -> list[str]:
        return [doc["_id"] async for doc in self.users.find({}, {"_id": 1}).sort("_id", 1)]

    async def count(self) -> int:
        return await self.users.count_documents({})

    async def verify_password(self, name: str, password: str) -> bool:
        document = await self.users.find_one({"_id": name})
        # Same work either way (a verification against a hash no password matches): no
        # user-existence timing oracle.
        stored = document["password"] if document is not None else None
        return await asyncio.to_thread(_verify, stored, password)

    async def _issue(self, user: str, kind: str, expires: dt.datetime | None, label: str) -> str:
        secret = secrets.token_urlsafe(32)
        await self.credentials.insert_one(
            {
                "_id": _digest(secret),
                "user": user,
                "kind": kind,
                "label": label,
                "created_at": dt.datetime.now(dt.UTC),
                "expires_at": expires,
            }
        )
        return secret

    async def login(self, user: str, ttl_s: float) -> str:
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ttl_s)
        return await self._issue(user, "session", expires, "login")

    async def create_api_key(self, user: str, label: str = "") -> str:
        if await self.users.find_one({"_id": user}) is None:
            raise UserError(f"no user {user!r}")
        return await self._issue(user, "api_key", None, label)

    async def resolve(self, secret: str) -> str | None:
        """The user a session token or API key belongs to, if it is valid now."""
        document = await self.credentials.find_one({"_id": _digest(secret)})
        if document is None:
            return None
        expires = document.get("expires_at")
        if expires is not None and expires < dt.datetime.now(dt.UTC):
            await self.credentials.delete_one({"_id": document["_id"]})
            return None
        user: str = document["user"]
        return user
