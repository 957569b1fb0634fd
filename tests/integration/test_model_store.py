"""The model store's registration claim against a real MongoDB-wire server: one
registration of a name at a time, decided by the database, not by a read beforehand."""

import asyncio
import datetime as dt

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from proto import ModelStatus, ModelType
from services.storage.models import ClaimedError, ModelStore, model_id
from services.storage.mongo import Document

pytestmark = pytest.mark.integration
CKPT = ModelType.STABLE_DIFFUSION


@pytest.fixture
async def store(fresh_db: AsyncDatabase[Document]) -> ModelStore:
    store = ModelStore(fresh_db)
    await store.ensure_indexes()
    return store


async def test_concurrent_claims_of_one_name_admit_exactly_one(store: ModelStore) -> None:
    claims = [store.claim(CKPT, "m.safetensors", f"/m/{n}", "upload") for n in range(8)]
    outcomes = await asyncio.gather(*claims, return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, ClaimedError)]
    assert (7, 1) == (len(refused), outcomes.count(None)), outcomes
    document = await store.get("m.safetensors")
    assert document is not None
    assert ModelStatus.REGISTERING.value == document["status"]


async def test_an_interrupted_claim_can_be_taken_over(store: ModelStore) -> None:
    assert await store.claim(CKPT, "m.safetensors", "/m/a", "upload") is None
    with pytest.raises(ClaimedError):
        await store.claim(CKPT, "m.safetensors", "/m/b", "upload")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    await store.update("m.safetensors", CKPT, {"registering_until": past})  # holder died
    known = await store.claim(CKPT, "m.safetensors", "/m/b", "upload")
    assert known is not None
    assert "/m/a" == known["path"]
    document = await store.get("m.safetensors")
    assert document is not None
    assert "/m/b" == document["path"]


async def test_unclaim_puts_back_what_was_there(store: ModelStore) -> None:
    await store.claim(CKPT, "new.safetensors", "/m/new", "upload")
    await store.unclaim(CKPT, "new.safetensors", None)
    assert await store.get_any("new.safetensors") is None
    await store.claim(CKPT, "kept.safetensors", "/m/v1", "upload")
    await store.set_status("kept.safetensors", ModelStatus.UNLOADED)
    before = await store.get("kept.safetensors")
    known = await store.claim(CKPT, "kept.safetensors", "/m/v2", "upload")
    assert before == known
    await store.unclaim(CKPT, "kept.safetensors", known)
    assert before == await store.get("kept.safetensors")
    assert model_id(CKPT, "kept.safetensors") == (before or {}).get("_id")
