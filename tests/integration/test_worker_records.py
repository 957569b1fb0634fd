"""Reading worker records is cheap enough to poll (the scheduler does, every tick)."""

from __future__ import annotations

import pytest

from proto import names
from proto.codec import encode
from proto.workers import WorkerState, WorkerStatus
from services.common import bus

pytestmark = pytest.mark.integration


async def test_polling_worker_records_leaves_no_consumers(private_nats_url: str) -> None:
    """``KeyValue.keys()`` made a consumer per call and nats-server refused the 1001st
    ("maximum consumers limit reached"), failing scheduler ticks under chaos tests."""
    nc = await bus.connect(private_nats_url, "records-poller")
    try:
        js = nc.jetstream()
        assert [] == await bus.worker_records(js)
        bucket = await bus.worker_bucket(js)
        for name in ("w1", "w2", "gone"):
            status = WorkerStatus(
                worker=name, model_key="k", model_name="m", state=WorkerState.READY
            )
            await bucket.put(name, encode(status))
        await bucket.delete("gone")
        for _ in range(1200):
            records = await bus.worker_records(js)
        assert ["w1", "w2"] == sorted(r.worker for r in records)
        info = await js.stream_info(f"KV_{names.WORKER_BUCKET}")
        assert 0 == info.state.consumer_count
    finally:
        await nc.close()
