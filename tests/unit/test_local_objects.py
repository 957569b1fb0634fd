"""The local object store's writes of several objects at once (a task's images)."""

from pathlib import Path

import pytest

from services.storage.objects import LocalObjectStore


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects", "http://127.0.0.1", "secret")


async def test_every_object_is_stored_whole(store: LocalObjectStore) -> None:
    images = [(f"images/u/t_{n}.png", bytes([n]) * 1000 * n) for n in range(1, 4)]
    await store.put_all(images)
    assert [data for _, data in images] == [await store.get(key) for key, _ in images]
    leftovers = [p.name for p in store.root.rglob("*") if p.name.endswith(".tmp")]
    assert [] == leftovers


async def test_a_bad_key_stores_none_of_them(store: LocalObjectStore) -> None:
    """Every key is checked before the first write."""
    with pytest.raises(ValueError, match="invalid object key"):
        await store.put_all([("images/u/t_1.png", b"a"), ("../outside.png", b"b")])
    assert not await store.exists("images/u/t_1.png")
    assert not (store.root.parent / "outside.png").exists()
