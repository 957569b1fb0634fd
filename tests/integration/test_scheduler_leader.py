"""Scheduler HA: a lease in NATS KV lets exactly one replica act, a dead or partitioned
leader is replaced within the lease TTL, and a deposed leader applies nothing.

Everything runs against a real nats-server of this module's own (the schedulers write
consumer limits, which must not meet other tests' consumers) and real MongoDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from proto import names
from services.common import bus
from services.common.servers import NatsServer, free_port
from services.scheduler.app import LeaseLost, Scheduler
from services.scheduler.lease import Lease
from services.scheduler.local import LocalBackend
from services.scheduler.policy import Plan
from services.scheduler.settings import SchedulerSettings
from services.storage.models import ModelStore
from services.storage.mongo import Document, database, open_client
from services.storage.tasks import TaskStore
from tests.integration.scheduling import checkpoint
from tests.waiting import until

pytestmark = pytest.mark.integration
TTL_S = 2.0


@pytest.fixture(scope="module")
async def nats_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    async with NatsServer(tmp_path_factory.mktemp("nats-leader")) as server:
        yield server.url


@pytest.fixture
async def db_name(mongo_server: Any) -> AsyncIterator[tuple[str, Any]]:
    client = open_client(mongo_server.url)
    name = f"leader_{secrets.token_hex(4)}"
    yield name, database(client, name)
    await client.drop_database(name)
    await client.close()


@contextlib.asynccontextmanager
async def connection(url: str) -> AsyncIterator[Client]:
    nc = await bus.connect(url, "leader-test")
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def _settings(nats_url: str, mongo_url: str, db: str, tmp: Path) -> SchedulerSettings:
    return SchedulerSettings(
        nats_url=nats_url,
        mongodb_url=mongo_url,
        mongodb_db=db,
        poll_interval_s=0.1,
        lease_ttl_s=TTL_S,
        worker_log_dir=str(tmp / "logs"),
        cache_dir=str(tmp / "cache"),
    )


async def test_of_two_leases_one_is_held_and_a_release_hands_it_over(nats_url: str) -> None:
    bucket = f"lease_{secrets.token_hex(3)}"
    async with connection(nats_url) as a_nc, connection(nats_url) as b_nc:
        a = Lease(a_nc.jetstream(), TTL_S, bucket=bucket, holder="a")
        b = Lease(b_nc.jetstream(), TTL_S, bucket=bucket, holder="b")
        assert [True, False] == [await a.keep(), await b.keep()]
        for _ in range(5):  # renewals keep it; the other keeps failing
            assert [True, False] == [await a.keep(), await b.keep()]
            await asyncio.sleep(TTL_S / 4)
        kv = await a_nc.jetstream().key_value(bucket)
        assert b"a" == (await kv.get(names.SCHEDULER_LEADER_KEY)).value
        await a.release()
        assert not a.held()
        assert await b.keep()  # at once: no waiting for the TTL after a clean release
        assert not await a.keep()
        assert b"b" == (await kv.get(names.SCHEDULER_LEADER_KEY)).value


async def test_a_replica_configured_with_another_ttl_follows_the_bucket(nats_url: str) -> None:
    """The server expires the entry after the bucket's max_age: a replica believing in a
    longer lease would act after another had taken over."""
    bucket = f"lease_{secrets.token_hex(3)}"
    async with connection(nats_url) as a_nc, connection(nats_url) as b_nc:
        first = Lease(a_nc.jetstream(), TTL_S, bucket=bucket, holder="a")
        assert await first.keep()
        longer = Lease(b_nc.jetstream(), 10 * TTL_S, bucket=bucket, holder="b")
        assert not await longer.keep()
        assert TTL_S == longer.ttl_s
        assert TTL_S * 0.2 == longer.request_timeout_s


async def test_two_schedulers_one_acts_and_the_other_takes_over_when_it_stops(
    nats_url: str, mongo_server: Any, db_name: tuple[str, Any], tmp_path: Path
) -> None:
    name, _ = db_name
    settings = _settings(nats_url, mongo_server.url, name, tmp_path)
    bucket = f"lease_{secrets.token_hex(3)}"
    async with contextlib.AsyncExitStack() as stack:
        mongo = open_client(mongo_server.url)
        stack.push_async_callback(mongo.close)
        db = database(mongo, name)
        schedulers, stops, runs = [], [], []
        for holder in ("one", "two"):
            nc = await stack.enter_async_context(connection(nats_url))
            backend = LocalBackend(settings)
            stack.push_async_callback(backend.aclose)
            lease = Lease(nc.jetstream(), TTL_S, bucket=bucket, holder=holder)
            scheduler = Scheduler(
                settings, nc.jetstream(), ModelStore(db), backend, TaskStore(db), lease
            )
            stop = asyncio.Event()
            schedulers.append(scheduler)
            stops.append(stop)
            runs.append(asyncio.create_task(scheduler.run(stop)))
        await until(lambda: any(s.ticks for s in schedulers), "a scheduler acting", timeout_s=10)
        await asyncio.sleep(2 * TTL_S)  # several renewals: still exactly one acts
        acting = [s for s in schedulers if s.ticks]
        assert 1 == len(acting), [s.ticks for s in schedulers]
        leader = acting[0]
        other = schedulers[1 - schedulers.index(leader)]
        assert leader.ticks > 10
        # A clean stop releases the lease: a delete of its entry (an expiry is no delete).
        watching = await stack.enter_async_context(connection(nats_url))
        kv = await watching.jetstream().key_value(bucket)
        watcher = await kv.watch(names.SCHEDULER_LEADER_KEY)
        stack.push_async_callback(watcher.stop)
        operations: list[str | None] = []

        async def record() -> None:
            async for entry in watcher:
                if entry is not None:
                    operations.append(entry.operation)

        recorder = asyncio.create_task(record())
        stops[schedulers.index(leader)].set()
        await runs[schedulers.index(leader)]
        took = await until(lambda: other.ticks > 0, "the other acting", timeout_s=TTL_S * 2)
        await until(lambda: "DEL" in operations, f"a release among {operations}", timeout_s=TTL_S)
        print(f"the other replica acted {took:.2f} s after a clean stop (TTL {TTL_S} s)")
        recorder.cancel()
        await asyncio.gather(recorder, return_exceptions=True)
        stops[schedulers.index(other)].set()
        await asyncio.gather(*runs)


class _Proxy:
    """A TCP relay in front of nats-server whose cut() is a network partition."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.listen_port = free_port()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.listen_port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.listen_port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()


async def test_a_partitioned_leader_stops_acting_before_another_takes_over(
    nats_url: str,
) -> None:
    bucket = f"lease_{secrets.token_hex(3)}"
    proxy = _Proxy(int(nats_url.rsplit(":", 1)[1]))
    await proxy.start()
    async with connection(proxy.url) as a_nc, connection(nats_url) as b_nc:
        a = Lease(a_nc.jetstream(), TTL_S, bucket=bucket, holder="partitioned")
        b = Lease(b_nc.jetstream(), TTL_S, bucket=bucket, holder="standby")
        assert await a.keep()
        assert not await b.keep()
        await proxy.cut()
        cut_at = time.monotonic()
        both: list[float] = []

        async def keep(lease: Lease) -> None:
            while True:
                await lease.keep()
                await asyncio.sleep(TTL_S / 4)

        keepers = [asyncio.create_task(keep(a)), asyncio.create_task(keep(b))]
        try:

            def check() -> bool:
                if a.held() and b.held():
                    both.append(time.monotonic())
                return b.held()

            took = await until(check, "taken over", timeout_s=3 * TTL_S, interval_s=0.005)
            lost_after = None if a.held() else "lost"
        finally:
            for keeper in keepers:
                keeper.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        assert [] == both  # never two leaders, not even for a moment
        assert "lost" == lost_after
        assert took < 2 * TTL_S
        print(
            f"partitioned leader replaced after {time.monotonic() - cut_at:.2f} s (TTL {TTL_S} s)"
        )


async def test_a_plan_computed_under_a_lease_that_lapsed_is_not_applied(
    nats_url: str, mongo_server: Any, db_name: tuple[str, Any], tmp_path: Path
) -> None:
    """The deposed leader read the consumers while it held the lease; by the time it
    would write, the lease has lapsed: the consumer limit stays as it was."""
    name, db = db_name
    settings = _settings(nats_url, mongo_server.url, name, tmp_path)
    models = ModelStore(db)
    await models.ensure_indexes()
    document = checkpoint(f"fence-{secrets.token_hex(3)}.safetensors")
    await models.upsert(document)
    key = document["model_key"]
    bucket = f"lease_{secrets.token_hex(3)}"
    async with connection(nats_url) as nc:
        js = nc.jetstream()
        await bus.ensure_streams(js, settings)
        await js.publish(names.task_subject(key), b"{}")  # backlog: the plan grants a slot

        class SlowReads(Scheduler):
            """Reading the consumers takes longer than the lease has left."""

            async def _load(self, model: Document, workers: int, busy: int, now: float) -> Any:
                load = await super()._load(model, workers, busy, now)
                await asyncio.sleep(TTL_S)
                return load

        backend = LocalBackend(settings)
        lease = Lease(js, TTL_S, bucket=bucket)
        scheduler = SlowReads(settings, js, models, backend, TaskStore(db), lease)
        assert await lease.keep()
        try:
            with pytest.raises(LeaseLost):
                await scheduler.tick()
            info = await js.consumer_info(names.TASK_STREAM, names.consumer_name(key))
            assert info.paused  # still paused: the slot was never granted
            assert 0 == backend.started
            # The same tick under a live lease does apply it.
            plain = Scheduler(settings, js, models, backend, TaskStore(db), None)
            result: Plan = await plain.tick()
            assert 1 == result.shares[key]
            info = await js.consumer_info(names.TASK_STREAM, names.consumer_name(key))
            assert not info.paused
        finally:
            await backend.aclose()
            await js.delete_consumer(names.TASK_STREAM, names.consumer_name(key))
            await js.purge_stream(names.TASK_STREAM)


async def _leader_value(nc: Client) -> str | None:
    try:
        kv = await nc.jetstream().key_value(names.LEADER_BUCKET)
        entry = await kv.get(names.SCHEDULER_LEADER_KEY)
    except (KeyNotFoundError, NatsTimeoutError, BucketNotFoundError):
        return None
    return entry.value.decode() if entry.value else None


async def test_killing_the_leader_process_hands_over_within_the_ttl(
    nats_url: str, mongo_server: Any, db_name: tuple[str, Any], tmp_path: Path
) -> None:
    """Two `python -m services.scheduler` processes; kill -9 the leader (no release)."""
    name, _ = db_name
    env = {
        **os.environ,
        "SDSWARM_NATS_URL": nats_url,
        "SDSWARM_MONGODB_URL": mongo_server.url,
        "SDSWARM_MONGODB_DB": name,
        "SDSWARM_LEASE_TTL_S": str(TTL_S),
        "SDSWARM_POLL_INTERVAL_S": "0.2",
        "SDSWARM_WORKER_LOG_DIR": str(tmp_path / "logs"),
        "SDSWARM_SCHEDULER_BACKEND": "local",
    }
    processes = []
    logs = []
    for n in range(2):
        log = (tmp_path / f"scheduler-{n}.log").open("wb")
        logs.append(log)
        processes.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.scheduler", env=env, stdout=log, stderr=log
            )
        )
    try:
        async with connection(nats_url) as nc:
            value: list[str | None] = [None]

            async def poll() -> None:
                value[0] = await _leader_value(nc)

            async def until_leader(
                check: Callable[[str], bool], timeout_s: float
            ) -> tuple[float, str]:
                started = time.monotonic()
                while True:
                    await poll()
                    if value[0] and check(value[0]):
                        return time.monotonic() - started, value[0]
                    assert time.monotonic() - started < timeout_s, value[0]
                    await asyncio.sleep(0.05)

            pids = {str(p.pid): p for p in processes}
            _, first = await until_leader(lambda v: v.split("-")[-2] in pids, 30)
            leader = pids[first.split("-")[-2]]
            leader.send_signal(signal.SIGKILL)
            await leader.wait()
            took, second = await until_leader(lambda v: v != first, 4 * TTL_S)
            assert second.split("-")[-2] in pids
            assert second != first
            print(f"leader killed -9: replaced after {took:.2f} s (TTL {TTL_S} s)")
            assert took < TTL_S + 1.0
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        await asyncio.gather(*(p.wait() for p in processes))
        for log in logs:
            log.close()
        for n in range(2):
            print((tmp_path / f"scheduler-{n}.log").read_text()[-2000:])
