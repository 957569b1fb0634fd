"""Model registry: one MongoDB document per registered model file.

A model is named by its type and its name, as clients send them: a checkpoint by
``stable_diffusion_model``, a LoRA by the ``<lora:name>`` tag, a VAE by ``sd_vae``.
Names are scoped by type (a LoRA and a checkpoint may share one), so ``_id`` is
``"<type>:<name>"`` and the name is kept in its own field. The model key derived from a
checkpoint's name names its subject, consumer and workers.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from proto import ModelStatus, ModelType, names
from services.storage.mongo import Document
from services.storage.readcache import ReadCache

CHECKPOINT = ModelType.STABLE_DIFFUSION
CLAIM_RENEW_S = 10.0
"""A registration in progress renews its claim this often; a claim 6× older is an
interrupted one (the gateway copying the file died)."""


class ClaimedError(Exception):
    """Another registration of the model is in progress."""


def claim_interrupted(doc: Document) -> bool:
    """A ``registering`` record whose copy stopped renewing its claim."""
    until = doc.get("registering_until")
    if doc["status"] != ModelStatus.REGISTERING.value or until is None:
        return False
    if until.tzinfo is None:
        until = until.replace(tzinfo=dt.UTC)  # MongoDB: naive UTC
    return bool(until < dt.datetime.now(dt.UTC))


def _claim_deadline() -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=6 * CLAIM_RENEW_S)


def canonical_name(name: str) -> str:
    """The one spelling of a model name: Unicode NFC, ``/`` separators never doubled nor
    trailing. ``café`` typed on macOS (NFD) and on Linux (NFC), or ``x.safetensors/`` and
    ``x.safetensors``, are one model. Every lookup and record goes through this."""
    return _SEPARATORS.sub("/", unicodedata.normalize("NFC", name)).rstrip("/")


_SEPARATORS = re.compile("/{2,}")
_INVISIBLE = frozenset({"Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"})
"""Controls, format characters (zero-width, bidi overrides), private-use, unassigned."""


def name_problem(name: str) -> str | None:
    """Why a name is refused as a look-alike of another, or None.

    A name that differs from another only by characters nobody sees (a zero-width space,
    a bidi override) or by an odd space (no-break, ideographic) would show as that other
    name in every listing; normalisation cannot fold them, so they are refused.
    """
    for char in name:
        category = unicodedata.category(char)
        if category in _INVISIBLE or (category == "Zs" and char != " "):
            return (
                f"`name` must not contain invisible characters or spaces other than U+0020"
                f" (found U+{ord(char):04X} {unicodedata.name(char, category)}): it would"
                " look like another name"
            )
    return None


def model_id(model_type: ModelType, name: str) -> str:
    return f"{model_type.value}:{canonical_name(name)}"


def model_key_for(model_type: ModelType, name: str) -> str:
    """Checkpoints keep the key of their bare name (their subject); others are scoped."""
    name = canonical_name(name)
    return names.model_key(name if model_type is CHECKPOINT else model_id(model_type, name))


def model_document(
    *,
    name: str,
    model_type: ModelType,
    path: str,
    family: str | None,
    size_bytes: int,
    sha256: str | None = None,
    mtime: float | None = None,
    prediction_type: str | None = None,
    status: ModelStatus = ModelStatus.UNLOADED,
    source: str | None = None,
) -> Document:
    now = dt.datetime.now(dt.UTC)
    name = canonical_name(name)
    return {
        "_id": model_id(model_type, name),
        "name": name,
        "type": model_type.value,
        "model_key": model_key_for(model_type, name),
        "path": path,
        "source": source,
        "family": family,
        "size_bytes": size_bytes,
        "sha256": sha256,
        "mtime": mtime,
        "prediction_type": prediction_type,
        "status": status.value,
        "registered_at": now,
        "modified_at": now,
        "error": None,
    }


def usable(model: dict[str, Any] | None) -> bool:
    """Registered, readable and not being deleted."""
    return (
        model is not None
        and model.get("status") not in (ModelStatus.FAILED.value, ModelStatus.REGISTERING.value)
        and not model.get("draining")
    )


def unregistered(model: Document) -> bool:
    """Being registered for the first time: no file is described yet (no SHA-256). The
    gateway refuses tasks for it and the scheduler starts no worker from this record (one
    would report no model hash); a re-registration keeps describing the old file until
    the new one is in place."""
    return model.get("status") == ModelStatus.REGISTERING.value and not model.get("sha256")


def warm_until(model: Document) -> dt.datetime | None:
    """Until when a pre-warmed checkpoint (``POST /models/{name}/warm``) keeps a worker."""
    until = model.get("warm_until")
    if not isinstance(until, dt.datetime):
        return None
    return until if until.tzinfo else until.replace(tzinfo=dt.UTC)  # MongoDB: naive UTC


class ModelStore:
    def __init__(self, db: AsyncDatabase[Document], *, cache_s: float = 0.0) -> None:
        """``cache_s``: how long :meth:`get_recent` and :meth:`list_recent` answers are
        remembered (:class:`~services.storage.readcache.ReadCache`; writes here forget
        them). The registry's own routes read fresh."""
        self.collection: AsyncCollection[Document] = db["models"]
        self.reads = ReadCache(cache_s)

    async def ensure_indexes(self) -> None:
        await self.collection.create_index("model_key", unique=True)
        await self.collection.create_index([("type", 1), ("name", 1)])

    async def upsert(self, document: Document, only_if: Document | None = None) -> None:
        """Register or refresh a model; the registration time of an existing one is kept.

        A model registered again after a delete starts a new life: its status and error
        are whatever ``document`` says. With ``only_if``, an existing record is changed
        only when it matches (else :class:`pymongo.errors.DuplicateKeyError`).
        """
        fields = {k: v for k, v in document.items() if k not in ("_id", "registered_at")}
        await self.collection.update_one(
            {"_id": document["_id"], **(only_if or {})},
            {"$set": fields, "$setOnInsert": {"registered_at": document["registered_at"]}},
            upsert=True,
        )
        await self.reads.wrote()

    async def claim(
        self, model_type: ModelType, name: str, path: str, source: str
    ) -> Document | None:
        """Record the model as ``registering`` for one registration, atomically; returns
        the live record as it was (None when new). :class:`ClaimedError` while another
        registration holds a fresh claim. The holder renews it (:meth:`renew_claim`)
        every ``CLAIM_RENEW_S``; a re-registration keeps what the old file had until the
        new one is in place."""
        known = await self.get(name, model_type)
        registering = known is not None and known["status"] == ModelStatus.REGISTERING.value
        if registering and not claim_interrupted(known or {}):
            raise ClaimedError(f"{model_type.value} {name!r} is being registered")
        document = model_document(
            name=name,
            model_type=model_type,
            path=path,
            family=None,
            size_bytes=0,
            status=ModelStatus.REGISTERING,
            source=source,
        )
        document["registering_until"] = _claim_deadline()
        if known:
            document |= {k: known.get(k) for k in ("family", "size_bytes", "sha256", "mtime")}
        free = {
            "$or": [
                {"status": {"$ne": ModelStatus.REGISTERING.value}},
                {"registering_until": {"$lt": dt.datetime.now(dt.UTC)}},
            ]
        }
        try:
            await self.upsert(document, only_if=free)
        except DuplicateKeyError as exc:  # claimed by another since we looked
            raise ClaimedError(f"{model_type.value} {name!r} is being registered") from exc
        return known

    async def renew_claim(self, name: str, model_type: ModelType) -> None:
        await self.update(name, model_type, {"registering_until": _claim_deadline()})

    async def unclaim(self, model_type: ModelType, name: str, known: Document | None) -> None:
        """Put back the record a failed registration claimed (none, or the model as it was)."""
        if known is None:
            await self.collection.delete_one(
                {"_id": model_id(model_type, name), "status": ModelStatus.REGISTERING.value}
            )
        else:
            await self.collection.replace_one({"_id": known["_id"]}, known)
        await self.reads.wrote()

    async def configure(self, model: Document, changes: dict[str, Any]) -> None:
        """Set a checkpoint's function settings (scheduler fields and ``function.*``)."""
        await self.collection.update_one({"_id": model["_id"]}, {"$set": changes})
        await self.reads.wrote()

    async def reset_function(self, model: Document) -> None:
        """A checkpoint's function back to defaults and to zero workers."""
        await self.collection.update_one(
            {"_id": model["_id"]},
            {
                "$set": {"min_instances": 0, "max_instances": None, "idle_timeout_s": 0.0},
                "$unset": {"function": ""},
            },
        )
        await self.reads.wrote()

    async def get(self, name: str, model_type: ModelType = CHECKPOINT) -> Document | None:
        """A live (not deleted) model by name."""
        return await self._live(name, model_type)

    async def get_recent(self, name: str, model_type: ModelType = CHECKPOINT) -> Document | None:
        """:meth:`get`, as read up to ``cache_s`` ago (every submission's lookups)."""
        return await self.reads.get(("get", model_type, name), lambda: self._live(name, model_type))

    async def _live(self, name: str, model_type: ModelType) -> Document | None:
        return await self.collection.find_one(
            {"_id": model_id(model_type, name), "status": {"$ne": ModelStatus.DELETED.value}}
        )

    async def get_any(self, name: str, model_type: ModelType = CHECKPOINT) -> Document | None:
        """A model by name, deleted ones included (history)."""
        return await self.collection.find_one({"_id": model_id(model_type, name)})

    async def by_key(self, model_key: str) -> Document | None:
        return await self.collection.find_one({"model_key": model_key})

    async def _list(self, model_type: ModelType | None, include_deleted: bool) -> list[Document]:
        query: Document = {}
        if not include_deleted:
            query["status"] = {"$ne": ModelStatus.DELETED.value}
        if model_type is not None:
            query["type"] = model_type.value
        return [doc async for doc in self.collection.find(query).sort([("type", 1), ("name", 1)])]

    async def list_recent(self, model_type: ModelType | None = None) -> list[Document]:
        """:meth:`list` (live models), as read up to ``cache_s`` ago (every submission's
        lookups: the embeddings a prompt may name, the adapters it may use)."""
        return await self.reads.get(("list", model_type), lambda: self._list(model_type, False))

    async def list(
        self, model_type: ModelType | None = None, *, include_deleted: bool = False
    ) -> list[Document]:
        return await self._list(model_type, include_deleted)

    async def set_status(
        self,
        name: str,
        status: ModelStatus,
        error: str | None = None,
        workers: int = 0,
        model_type: ModelType = CHECKPOINT,
    ) -> None:
        """Set a live model's status (a deleted model stays deleted)."""
        await self.collection.update_one(
            {"_id": model_id(model_type, name), "status": {"$ne": ModelStatus.DELETED.value}},
            {
                "$set": {
                    "status": status.value,
                    "error": error,
                    "loaded_workers": workers,
                    "modified_at": dt.datetime.now(dt.UTC),
                }
            },
        )
        await self.reads.wrote()

    async def update(
        self, name: str, model_type: ModelType, fields: dict[str, Any]
    ) -> Document | None:
        """Set fields of a live model; returns the new document (None when absent)."""
        document = await self.collection.find_one_and_update(
            {"_id": model_id(model_type, name), "status": {"$ne": ModelStatus.DELETED.value}},
            {"$set": {**fields, "modified_at": dt.datetime.now(dt.UTC)}},
            return_document=ReturnDocument.AFTER,
        )
        await self.reads.wrote()
        return document

    async def record_cold_start(
        self, model: Document, seconds: float, phases: dict[str, float]
    ) -> None:
        """The checkpoint's measured cold start and its phases (the scheduler's view)."""
        await self.collection.update_one(
            {"_id": model["_id"]},
            {"$set": {"cold_start_s": seconds, "cold_start_phases": phases}},
        )
        await self.reads.wrote()

    async def mark_deleted(self, name: str, model_type: ModelType) -> Document | None:
        """Mark a live model deleted (kept for history); None when there was none."""
        return await self.update(
            name, model_type, {"status": ModelStatus.DELETED.value, "loaded_workers": 0}
        )
