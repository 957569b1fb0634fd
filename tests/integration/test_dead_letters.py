"""A task whose deliveries all fail ends `failed` with a reason; nothing stays stuck."""

import asyncio
import contextlib
import secrets
import time
from typing import Any

import msgspec
import pytest
from nats.js.errors import NotFoundError

from proto import GenerateImage, names
from proto.codec import encode
from proto.commands import Txt2ImgTask
from proto.requests import Txt2ImgRequest
from services.common import bus
from services.common.servers import NatsServer
from services.common.settings import BusSettings
from services.storage.deadletters import DeadLetterStore, run_dead_letters
from services.storage.mongo import database, open_client
from services.storage.sink import run_sink
from services.storage.tasks import TaskStore
from tests.documents import task_document

pytestmark = pytest.mark.integration


async def test_max_deliveries_fails_the_task_and_keeps_a_dead_letter(
    tmp_path: Any, mongo_server: Any
) -> None:
    # A NATS server of its own: this test changes stream-wide settings.
    settings = BusSettings(ack_wait_s=0.5, max_deliver=2)
    async with NatsServer(tmp_path / "nats") as server:
        nc = await bus.connect(server.url, "dead-letter-test")
        js = nc.jetstream()
        await bus.ensure_streams(js, settings)
        await bus.ensure_task_consumer(js, "m-000000", settings)
        client = open_client(mongo_server.url)
        db = database(client, f"dl_{secrets.token_hex(4)}")
        tasks = TaskStore(db)
        task_id = secrets.token_hex(6)
        await tasks.insert(task_document(task_id))
        command = Txt2ImgTask(
            task_id=task_id,
            user="u",
            model_name="m",
            model_key="m-000000",
            request=msgspec.convert({"stable_diffusion_model": "m"}, Txt2ImgRequest),
        )
        await js.publish(
            names.task_subject("m-000000"), encode(command), headers={names.MSG_ID_HEADER: task_id}
        )
        stop = asyncio.Event()
        services = [
            asyncio.create_task(run_sink(nc, tasks, stop)),
            asyncio.create_task(run_dead_letters(nc, db, stop)),
        ]
        # A "worker" that takes the task and dies every time (never acks).
        pull = await js.pull_subscribe_bind(
            durable=names.consumer_name("m-000000"), stream=names.TASK_STREAM
        )
        taken = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            doc = await tasks.get(task_id)
            if doc is not None and doc["status"] == "failed":
                break
            with contextlib.suppress(TimeoutError):
                taken += len(await pull.fetch(1, timeout=0.5))
        stop.set()
        await asyncio.gather(*services)
        assert 2 == taken
        assert doc is not None
        assert ("failed", "max_deliveries") == (doc["status"], doc["code"])
        assert "gave up after 2 deliveries" in doc["message"]
        letter = await db["dead_letters"].find_one({"task_id": task_id})
        assert letter is not None
        assert command == msgspec.json.decode(letter["payload"], type=GenerateImage)
        # What GET /deadletters lists: the record without its (possibly large) payload.
        listed = await DeadLetterStore(db).recent(10)
        assert [letter["_id"]] == [d["_id"] for d in listed]
        assert "payload" not in listed[0]
        assert (task_id, 2) == (listed[0]["task_id"], listed[0]["deliveries"])
        # The command is gone from the work queue instead of lingering there.
        with pytest.raises(NotFoundError):
            await js.get_msg(names.TASK_STREAM, 1)
        await client.drop_database(db.name)
        await client.close()
        await nc.close()
