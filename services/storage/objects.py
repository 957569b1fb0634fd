"""Object store: images, uploaded inputs and previews.

Two backends behind one protocol: a local folder (embedded default; download links
are HMAC-signed URLs served by the gateway, so local mode has working result URLs,
unlike the seed's) and any S3-compatible endpoint through aioboto3. Keys are always
built server-side (:mod:`proto.names`); both backends still refuse keys that could
escape their prefix.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Any, Protocol

from services.common.settings import StoreSettings

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_\-./]{0,511}$")


CHUNK = 1024 * 1024


class ObjectNotFoundError(LookupError):
    pass


def check_key(key: str) -> str:
    if not _KEY_RE.fullmatch(key) or ".." in key.split("/") or "//" in key:
        raise ValueError(f"invalid object key {key!r}")
    return key


class ObjectStore(Protocol):
    async def put(self, key: str, data: bytes, content_type: str = "image/png") -> None: ...
    async def put_all(
        self, objects: Sequence[tuple[str, bytes]], content_type: str = "image/png"
    ) -> None:
        """Several objects (a task's images), each whole or absent, in no order."""
        ...

    async def get(self, key: str, limit: int | None = None) -> bytes:
        """The object's bytes (its first ``limit`` bytes only, when given)."""
        ...

    async def exists(self, key: str) -> bool: ...
    def stream(self, key: str, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        """The object's bytes in chunks, never whole in memory (model files)."""
        ...

    async def etag(self, key: str) -> str | None:
        """The store's ETag (S3: the MD5 of a single-part upload); None if it keeps none."""
        ...

    async def presign(self, key: str, ttl_s: int) -> str: ...
    async def ping(self) -> None: ...
    async def aclose(self) -> None: ...


def _read(path: Path, limit: int | None) -> bytes:
    with path.open("rb") as handle:
        return handle.read(-1 if limit is None else limit)


class LocalObjectStore:
    """Objects as files under ``root``; links signed with HMAC-SHA256 over key and expiry."""

    def __init__(self, root: Path, public_url: str, secret: str) -> None:
        self.root = root.resolve()
        self.public_url = public_url.rstrip("/")
        self._secret = secret.encode() or secrets.token_bytes(32)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"invalid object key {key!r}")
        return path

    async def put(self, key: str, data: bytes, content_type: str = "image/png") -> None:
        path = self._path(key)
        await asyncio.to_thread(_atomic_write, path, data)

    async def put_all(
        self, objects: Sequence[tuple[str, bytes]], content_type: str = "image/png"
    ) -> None:
        # One trip to a thread for all of them: a worker's loop woken once, not per image.
        await asyncio.to_thread(_atomic_writes, [(self._path(k), data) for k, data in objects])

    async def get(self, key: str, limit: int | None = None) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(_read, path, limit)
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(key) from exc

    async def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    async def stream(self, key: str, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(key) from exc
        try:
            while chunk := await asyncio.to_thread(handle.read, chunk_size):
                yield chunk
        finally:
            handle.close()

    async def file(self, key: str) -> Path:
        """The file holding an object (served as it is: Range, ETag, sendfile)."""
        path = self._path(key)
        if not await asyncio.to_thread(path.is_file):
            raise ObjectNotFoundError(key)
        return path

    async def etag(self, key: str) -> str | None:
        if not await asyncio.to_thread(self._path(key).is_file):
            raise ObjectNotFoundError(key)
        return None  # a folder keeps no digests; callers verify what they read

    def signature(self, key: str, expires: int) -> str:
        return hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: int, signature: str) -> bool:
        if expires < time.time():
            return False
        return hmac.compare_digest(self.signature(key, expires), signature)

    async def presign(self, key: str, ttl_s: int) -> str:
        check_key(key)
        expires = int(time.time()) + ttl_s
        query = urllib.parse.urlencode(
            {"expires": expires, "signature": self.signature(key, expires)}
        )
        return f"{self.public_url}/files/{urllib.parse.quote(key)}?{query}"

    async def ping(self) -> None:
        if not self.root.is_dir():
            raise OSError(f"object store folder {self.root} is missing")

    async def aclose(self) -> None:
        return None


def _atomic_writes(objects: list[tuple[Path, bytes]]) -> None:
    for path, data in objects:
        _atomic_write(path, data)


def _atomic_write(path: Path, data: bytes) -> None:
    # Write then rename: a reader never sees half an image, a crash leaves no partial file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


class S3ObjectStore:
    """Any S3-compatible endpoint (SeaweedFS, MinIO, AWS S3, Alibaba OSS)."""

    def __init__(
        self, client: Any, bucket: str, stack: AsyncExitStack, presigner: Any = None
    ) -> None:
        self._client = client
        self.bucket = bucket
        self._stack = stack
        self._presigner = presigner or client
        """Signs result URLs: a client of the public endpoint when it differs (signing
        is local: it never connects)."""

    @classmethod
    async def open(cls, settings: StoreSettings) -> S3ObjectStore:
        stack = AsyncExitStack()
        # Imported here: aioboto3 (and aiohttp under it) cost every process that only
        # uses a local folder ~0.5 s of start-up.
        import aioboto3
        from botocore.config import Config

        session = aioboto3.Session()

        async def client_of(endpoint_url: str) -> Any:
            return await stack.enter_async_context(
                session.client(
                    "s3",
                    endpoint_url=endpoint_url,
                    aws_access_key_id=settings.s3_access_key or None,
                    aws_secret_access_key=settings.s3_secret_key or None,
                    region_name=settings.s3_region,
                    # SigV4 everywhere: botocore would presign with SigV2 for us-east-1.
                    config=Config(signature_version="s3v4"),
                )
            )

        client = await client_of(settings.s3_endpoint_url)
        public = settings.s3_public_url.rstrip("/")
        presigner = None
        if public and public != settings.s3_endpoint_url.rstrip("/"):
            presigner = await client_of(public)
        store = cls(client, settings.s3_bucket, stack, presigner)
        try:
            await store._ensure_bucket()
        except BaseException:
            await stack.aclose()
            raise
        return store

    async def _ensure_bucket(self) -> None:
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except self._client.exceptions.ClientError:
            with suppress(self._client.exceptions.BucketAlreadyOwnedByYou):
                await self._client.create_bucket(Bucket=self.bucket)

    async def put(self, key: str, data: bytes, content_type: str = "image/png") -> None:
        await self._client.put_object(
            Bucket=self.bucket, Key=check_key(key), Body=data, ContentType=content_type
        )

    async def put_all(
        self, objects: Sequence[tuple[str, bytes]], content_type: str = "image/png"
    ) -> None:
        await asyncio.gather(*(self.put(key, data, content_type) for key, data in objects))

    async def get(self, key: str, limit: int | None = None) -> bytes:
        ranged = {} if limit is None else {"Range": f"bytes=0-{max(limit, 1) - 1}"}
        try:
            response = await self._client.get_object(
                Bucket=self.bucket, Key=check_key(key), **ranged
            )
        except self._client.exceptions.NoSuchKey as exc:
            raise ObjectNotFoundError(key) from exc
        async with response["Body"] as body:
            data: bytes = await body.read()
        return data

    async def exists(self, key: str) -> bool:
        try:
            await self._client.head_object(Bucket=self.bucket, Key=check_key(key))
        except self._client.exceptions.ClientError:
            return False
        return True

    async def stream(self, key: str, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        try:
            response = await self._client.get_object(Bucket=self.bucket, Key=check_key(key))
        except self._client.exceptions.NoSuchKey as exc:
            raise ObjectNotFoundError(key) from exc
        async with response["Body"] as body:
            async for chunk in body.iter_chunks(chunk_size):
                yield chunk

    async def etag(self, key: str) -> str | None:
        try:
            head = await self._client.head_object(Bucket=self.bucket, Key=check_key(key))
        except self._client.exceptions.ClientError as exc:
            raise ObjectNotFoundError(key) from exc
        return str(head.get("ETag", "")).strip('"') or None

    async def presign(self, key: str, ttl_s: int) -> str:
        url: str = await self._presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": check_key(key)}, ExpiresIn=ttl_s
        )
        return url

    async def ping(self) -> None:
        await self._client.head_bucket(Bucket=self.bucket)

    async def aclose(self) -> None:
        await self._stack.aclose()


async def open_object_store(settings: StoreSettings) -> ObjectStore:
    if settings.s3_endpoint_url:
        return await S3ObjectStore.open(settings)
    return LocalObjectStore(Path(settings.store_dir), settings.public_url, settings.url_secret)
