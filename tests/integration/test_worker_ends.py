"""How a worker lets go of its messages, on a real bus: a task handed out twice ends once,
and a stopping worker hands back at once what it fetched ahead.

A nats-server killed with kill -9 can lose a consumer's last acks and delivery counts
and hand out again a task that is running or has just ended, under another delivery
count. Both attempts run to the end; the event stream must keep one end (the chaos
suite counts a second as a duplicate), and both messages must be acked."""

from __future__ import annotations

import asyncio
import secrets
import threading
from pathlib import Path
from typing import Any

import pytest

from proto import GenerateImage, names
from proto.codec import decode_generate, encode
from services.common import bus
from services.inference.batched import Member
from services.inference.pipeline import Generation
from tests.fakes import FakePipeline, ends_stored, worker_on_bus
from tests.waiting import until_read

pytestmark = pytest.mark.integration


class Instant(FakePipeline):
    """Answers at once with one tiny image."""

    def answer(self, command: GenerateImage) -> Generation:
        return Generation(seeds=[1], images=[b"png"])


async def test_two_attempts_running_at_once_end_the_task_once(
    nats_server: Any, tmp_path: Path
) -> None:
    async with worker_on_bus(nats_server.url, tmp_path, Instant) as on:
        js, worker = on.js, on.worker
        worker._cancels = await bus.cancel_bucket(js, on.settings)  # as run() sets it up
        task_id = secrets.token_hex(12)
        await bus.ensure_task_consumer(js, on.key, on.settings, max_ack_pending=4)
        # The same task twice on the queue, as a consumer that lost its state hands it out.
        for copy in ("a", "b"):
            await js.publish(
                names.task_subject(on.key),
                encode(on.command(task_id)),
                stream=names.TASK_STREAM,
                headers={names.MSG_ID_HEADER: f"{task_id}-{copy}"},
            )
        subscription = await js.pull_subscribe_bind(names.consumer_name(on.key), names.TASK_STREAM)
        first, second = await subscription.fetch(2, timeout=10)
        await second.nak()
        [again] = await subscription.fetch(1, timeout=10)
        assert (1, 2) == (first.metadata.num_delivered, again.metadata.num_delivered)
        # Held together: neither end is out when the other is admitted, so both run.
        await worker.handle_batch([first, again])
        await asyncio.wait_for(worker.drain_outputs(), 30)
        assert 1 == await ends_stored(js, task_id)
        info = await js.consumer_info(names.TASK_STREAM, names.consumer_name(on.key))
        assert 0 == info.num_pending + info.num_ack_pending, "both messages acked"


class Held(FakePipeline):
    """Runs until the test lets it finish."""

    def __init__(self) -> None:
        self.running = threading.Event()
        self.release = threading.Event()

    def answer(self, command: GenerateImage) -> Generation:
        self.running.set()
        assert self.release.wait(30), "never released"
        return Generation(seeds=[1], images=[b"png"])


async def test_a_stopping_worker_hands_back_what_it_fetched_ahead_at_once(
    nats_server: Any, tmp_path: Path
) -> None:
    """The next batch is fetched while one runs. Asked to stop, the worker hands that
    fetch back at once (another worker takes it now, not after the ack deadline) and
    lets the running task finish within the grace period."""
    pipeline = Held()
    async with worker_on_bus(
        nats_server.url, tmp_path, lambda: pipeline, fetch_timeout_s=0.5, stop_grace_s=30
    ) as on:
        js = on.js
        consumer = names.consumer_name(on.key)
        ids = [secrets.token_hex(12) for _ in range(3)]
        try:
            await bus.ensure_task_consumer(js, on.key, on.settings, max_ack_pending=2)
            for task_id in ids:
                command = encode(on.command(task_id))
                await js.publish(names.task_subject(on.key), command, stream=names.TASK_STREAM)
            stop = asyncio.Event()
            running = asyncio.create_task(on.worker.run(stop))
            assert await asyncio.to_thread(pipeline.running.wait, 30), "the first never ran"

            async def held() -> int:
                return int((await js.consumer_info(names.TASK_STREAM, consumer)).num_ack_pending)

            await until_read(held, 2, "the next task fetched ahead")
            stop.set()
            # Handed back at once: another worker gets it now, long before the grace
            # period or the ack deadline (60 s) would have let it go.
            other = await js.pull_subscribe_bind(consumer, names.TASK_STREAM)
            [again] = await other.fetch(1, timeout=5)
            task_id, delivered = decode_generate(again.data).task_id, again.metadata.num_delivered
            assert (ids[1], 2) == (task_id, delivered)
            await again.ack()  # that other worker's business now
            pipeline.release.set()
            await asyncio.wait_for(running, 30)  # the running task finished within the grace
            assert [1, 0, 0] == [await ends_stored(js, task_id) for task_id in ids]
            info = await js.consumer_info(names.TASK_STREAM, consumer)
            assert (1, 0) == (info.num_pending, info.num_ack_pending), "the third still queued"
        finally:
            pipeline.release.set()  # a failed check leaves no thread waiting


class Batches(Held):
    """Holds its first call until released; records which tasks each call ran together."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []

    def answer(self, command: GenerateImage) -> Generation:
        self.calls.append([command.task_id])
        return super().answer(command)

    def generate_batch(self, members: list[Member]) -> None:
        self.calls.append([member.command.task_id for member in members])
        for member in members:
            member.outcome = Generation(seeds=[1], images=[b"png"])


async def test_a_batch_fetched_ahead_is_topped_up_with_what_came_since(
    nats_server: Any, tmp_path: Path
) -> None:
    """The next batch is fetched while one runs, so it holds what was queued then (often
    a task or two); when its turn comes it takes in what has been queued since, up to
    ``max_batch``, instead of leaving it to a batch of its own after it."""
    pipeline = Batches()
    async with worker_on_bus(nats_server.url, tmp_path, lambda: pipeline, max_batch=4) as on:
        js = on.js
        consumer = names.consumer_name(on.key)
        ids = [secrets.token_hex(12) for _ in range(4)]

        async def queue(task_id: str) -> None:
            command = encode(on.command(task_id))
            await js.publish(names.task_subject(on.key), command, stream=names.TASK_STREAM)

        async def counts() -> tuple[int, int]:
            info = await js.consumer_info(names.TASK_STREAM, consumer)
            return info.num_ack_pending, info.num_pending

        try:
            await bus.ensure_task_consumer(js, on.key, on.settings, max_ack_pending=8)
            await queue(ids[0])
            stop = asyncio.Event()
            running = asyncio.create_task(on.worker.run(stop))
            assert await asyncio.to_thread(pipeline.running.wait, 30), "the first never ran"
            await queue(ids[1])
            await until_read(counts, (2, 0), "the second fetched ahead, alone")
            for task_id in ids[2:]:
                await queue(task_id)
            await until_read(counts, (2, 2), "two more queued behind it")
            pipeline.release.set()
            await until_read(counts, (0, 0), "every task done")
            stop.set()
            await asyncio.wait_for(running, 30)
            assert [ids[:1], ids[1:]] == pipeline.calls
        finally:
            pipeline.release.set()  # a failed check leaves no thread waiting
