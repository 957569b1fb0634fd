"""Every store writes with a majority, journaled write concern."""

from __future__ import annotations

from services.storage.mongo import database, open_client


async def test_databases_write_durably() -> None:
    client = open_client("mongodb://127.0.0.1:1")  # never contacted: connections are lazy
    try:
        db = database(client, "sdswarm")
        assert {"w": "majority", "j": True} == db.write_concern.document
        assert {"w": "majority", "j": True} == db["tasks"].write_concern.document
    finally:
        await client.close()
