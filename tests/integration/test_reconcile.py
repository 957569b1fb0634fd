"""The reconciler: a task whose publish never landed is published again (once), and a
task whose message is gone ends `failed` with a reason instead of waiting forever."""

import datetime as dt
import secrets
from collections.abc import AsyncIterator
from typing import Any, cast

import nats.errors
import pytest
from nats.js import JetStreamContext

from proto import names
from proto.codec import encode
from proto.commands import Txt2ImgTask
from proto.events import TaskFailed, TaskStarted, decode_event, encode_event
from proto.requests import Txt2ImgRequest
from services.common import bus
from services.common.settings import BusSettings
from services.storage.reconcile import reconcile_once
from services.storage.tasks import TaskStore
from tests.documents import task_document

pytestmark = pytest.mark.integration
KEY = f"reconcile-{secrets.token_hex(3)}"


@pytest.fixture
async def parts(nats_server: Any, fresh_db: Any) -> AsyncIterator[tuple[Any, TaskStore]]:
    nc = await bus.connect(nats_server.url, "reconcile-test")
    js = nc.jetstream()
    await bus.ensure_streams(js, BusSettings())
    yield js, TaskStore(fresh_db)
    await nc.close()


async def _task(
    tasks: TaskStore, age_s: float, prompt: str = "p", raw: bytes | None = None
) -> tuple[str, bytes]:
    """An open task document as the gateway inserts it, created ``age_s`` ago (with the
    command ``raw`` instead of a real one when given)."""
    task_id = secrets.token_hex(12)
    command = encode(
        Txt2ImgTask(
            task_id=task_id,
            user="u",
            model_name="m",
            model_key=KEY,
            request=Txt2ImgRequest(prompt=prompt, stable_diffusion_model="m"),
        )
    )
    command = command if raw is None else raw
    document = task_document(task_id, model_key=KEY, command=command)
    document["created_at"] -= dt.timedelta(seconds=age_s)
    await tasks.insert(document)
    return task_id, command


async def _seq(tasks: TaskStore, task_id: str) -> int | None:
    document = await tasks.get(task_id)
    assert document is not None
    seq: int | None = document["stream_seq"]
    return seq


async def _run(js: JetStreamContext, tasks: TaskStore) -> tuple[int, int]:
    done = await reconcile_once(js, tasks, grace_s=30, lost_after_s=300)
    return done.republished, done.failed


async def test_unconfirmed_publish_is_sent_again_once(parts: tuple[Any, TaskStore]) -> None:
    js, tasks = parts
    young, _ = await _task(tasks, age_s=1)
    stranded, command = await _task(tasks, age_s=60)

    assert (1, 0) == await _run(js, tasks)
    seq = await _seq(tasks, stranded)
    assert seq is not None
    message = await js.get_msg(names.TASK_STREAM, seq)
    assert (names.task_subject(KEY), command) == (message.subject, message.data)
    assert None is await _seq(tasks, young), "a young task's publish may still be in flight"

    # Nothing more to do: the message is there.
    assert (0, 0) == await _run(js, tasks)


async def test_a_publish_that_did_land_is_not_duplicated(parts: tuple[Any, TaskStore]) -> None:
    js, tasks = parts
    task_id, command = await _task(tasks, age_s=60)
    # The gateway published, then died before recording the sequence.
    ack = await js.publish(
        names.task_subject(KEY),
        command,
        stream=names.TASK_STREAM,
        headers={names.MSG_ID_HEADER: task_id},
    )
    assert (0, 0) == await _run(js, tasks), "JetStream's de-duplication caught the resend"
    assert ack.seq == await _seq(tasks, task_id)


async def test_a_lost_message_fails_the_task_with_a_reason(parts: tuple[Any, TaskStore]) -> None:
    js, tasks = parts
    task_id, command = await _task(tasks, age_s=400)
    ack = await js.publish(names.task_subject(KEY), command, stream=names.TASK_STREAM)
    await tasks.set_stream_seq(task_id, ack.seq)
    assert (0, 0) == await _run(js, tasks), "the message is still queued: nothing to do"

    await js.delete_msg(names.TASK_STREAM, ack.seq)  # as if the server lost it
    assert (0, 1) == await _run(js, tasks)
    raw = await js.get_last_msg(names.EVENT_STREAM, names.event_subject(task_id, "failed"))
    event = decode_event(raw.data or b"")
    assert isinstance(event, TaskFailed)
    assert ("task_lost", "reconciler") == (event.code, event.worker)
    # The sink folds it like any other event: the task is terminal with the reason.
    assert await tasks.apply(event)
    document = await tasks.get(task_id)
    assert document is not None
    assert ("failed", "task_lost") == (document["status"], document["code"])


async def test_a_task_a_worker_reported_on_is_not_sent_again(
    parts: tuple[Any, TaskStore],
) -> None:
    """After a server restart JetStream forgets the ids of acked messages: the evidence
    that the publish landed is then the task's own events."""
    js, tasks = parts
    task_id, _ = await _task(tasks, age_s=60)
    started = TaskStarted(task_id=task_id, attempt=1, at=0.0, worker="w", model_key=KEY)
    await js.publish(
        names.event_subject(task_id, "started"), encode_event(started), stream=names.EVENT_STREAM
    )
    assert (0, 0) == await _run(js, tasks)
    assert -1 == await _seq(tasks, task_id)
    assert (0, 0) == await _run(js, tasks), "landed at an unknown sequence: never failed as lost"


async def test_an_unpublishable_task_fails_alone_and_the_pass_goes_on(
    parts: tuple[Any, TaskStore],
) -> None:
    """Issue 15, item 2: a command larger than NATS's max payload used to abort every
    pass, so other users' unconfirmed tasks were never published again."""
    js, tasks = parts
    huge, _ = await _task(tasks, age_s=90, prompt="x" * 1_200_000)
    corrupt, _ = await _task(tasks, age_s=80, raw=b"\x93not a command")
    stranded, command = await _task(tasks, age_s=60)

    done = await reconcile_once(js, tasks, grace_s=30, lost_after_s=300)
    assert (1, 2, 0) == (done.republished, done.failed, done.skipped)
    seq = await _seq(tasks, stranded)
    assert seq is not None, "the task after the bad ones was published again"
    assert command == (await js.get_msg(names.TASK_STREAM, seq)).data
    for task_id, reason in ((huge, "larger than the NATS server accepts"), (corrupt, "decoded")):
        raw = await js.get_last_msg(names.EVENT_STREAM, names.event_subject(task_id, "failed"))
        event = decode_event(raw.data or b"")
        assert isinstance(event, TaskFailed)
        assert ("unpublishable", "reconciler") == (event.code, event.worker)
        assert reason in event.message
        assert await tasks.apply(event)
        document = await tasks.get(task_id)
        assert document is not None
        assert ("failed", "unpublishable") == (document["status"], document["code"])
    # Folded: the next pass has nothing left to do.
    assert (0, 0) == await _run(js, tasks)


class _FlakyPublish:
    """The real JetStream context whose next ``failures`` publishes time out."""

    def __init__(self, js: JetStreamContext, failures: int) -> None:
        self.js, self.failures = js, failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self.js, name)

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise nats.errors.TimeoutError
        return await self.js.publish(*args, **kwargs)


async def test_a_passing_error_skips_one_task_until_the_next_pass(
    parts: tuple[Any, TaskStore],
) -> None:
    js, tasks = parts
    first, _ = await _task(tasks, age_s=90)
    second, _ = await _task(tasks, age_s=60)
    flaky = cast(JetStreamContext, _FlakyPublish(js, failures=1))
    done = await reconcile_once(flaky, tasks, grace_s=30, lost_after_s=300)
    assert (1, 0, 1) == (done.republished, done.failed, done.skipped)
    assert [None, True] == [await _seq(tasks, first), await _seq(tasks, second) is not None]
    assert (1, 0) == await _run(js, tasks), "retried on the next pass"

    # NATS itself away: the pass ends after max_errors in a row instead of waiting on each.
    await _task(tasks, age_s=60)
    await _task(tasks, age_s=60)
    flaky = cast(JetStreamContext, _FlakyPublish(js, failures=5))
    with pytest.raises(nats.errors.TimeoutError):
        await reconcile_once(flaky, tasks, grace_s=30, lost_after_s=300, max_errors=2)
