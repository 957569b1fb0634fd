"""The test harness's servers are the real thing, and stopping them leaves nothing behind.

NATS: JetStream work queue with ``Nats-Msg-Id`` dedupe. SecantusDB: exactly the query and
update operators the task store uses. SeaweedFS: signed S3 calls and a presigned GET.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aioboto3
import aiohttp
import nats
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from pymongo import AsyncMongoClient, ReturnDocument

from services.common.servers import (
    ManagedServer,
    MongoServer,
    NatsServer,
    PortInUseError,
    SeaweedS3,
    claim_port,
    port_free,
)
from services.common.settings import StoreSettings
from services.storage.objects import open_object_store
from tests.procs import processes
from tests.servers import MongoInfo, NatsInfo, S3Info
from tests.waiting import until

pytestmark = pytest.mark.integration


async def test_nats_jetstream_work_queue_dedupes_by_msg_id(nats_server: NatsInfo) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        name = f"T_{secrets.token_hex(4)}"
        subject = f"t{name.lower()}.work"
        await js.add_stream(
            StreamConfig(
                name=name,
                subjects=[subject],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                duplicate_window=60.0,
            )
        )
        first = await js.publish(subject, b"job", headers={"Nats-Msg-Id": "task-1"})
        again = await js.publish(subject, b"job", headers={"Nats-Msg-Id": "task-1"})
        assert not first.duplicate
        assert again.duplicate
        assert 1 == (await js.stream_info(name)).state.messages

        sub = await js.pull_subscribe(subject, durable="worker", stream=name)
        [msg] = await sub.fetch(1, timeout=5)
        assert b"job" == msg.data
        await msg.ack_sync()
        # Work-queue retention: an acked message is gone from the stream.
        assert 0 == (await js.stream_info(name)).state.messages
        await js.delete_stream(name)
    finally:
        await nc.close()


async def test_mongo_operators_used_by_the_task_store(mongo_server: MongoInfo) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_server.url)
    name = f"test_servers_{secrets.token_hex(4)}"
    tasks = client[name]["tasks"]
    try:
        await tasks.insert_many(
            [
                {"_id": "a", "status": "waiting", "attempt": 1, "created": 10},
                {"_id": "b", "status": "running", "attempt": 2, "created": 20},
                {"_id": "c", "status": "succeeded", "attempt": 1, "created": 30},
            ]
        )
        assert {"_id": "b", "status": "running", "attempt": 2, "created": 20} == (
            await tasks.find_one({"_id": "b"})
        )

        live = {"status": {"$in": ["waiting", "running"]}}
        found = [doc["_id"] async for doc in tasks.find(live).sort("created", 1)]
        assert ["a", "b"] == found
        older = [doc["_id"] async for doc in tasks.find({"created": {"$lt": 30}}).sort("_id", 1)]
        assert ["a", "b"] == older

        result = await tasks.update_one(
            {"_id": "a", "attempt": {"$lte": 1}, "status": {"$in": ["waiting"]}},
            {"$set": {"status": "running", "attempt": 1}},
        )
        assert 1 == result.matched_count
        # A stale attempt matches nothing: the fence the event fold relies on.
        stale = await tasks.update_one(
            {"_id": "b", "attempt": {"$lt": 2}}, {"$set": {"status": "failed"}}
        )
        assert 0 == stale.matched_count

        after = await tasks.find_one_and_update(
            {"_id": "b", "status": {"$in": ["waiting", "running"]}, "attempt": {"$lte": 2}},
            {"$set": {"status": "succeeded", "progress": 1.0}},
            return_document=ReturnDocument.AFTER,
        )
        assert after is not None
        assert ("succeeded", 1.0) == (after["status"], after["progress"])
        before = await tasks.find_one_and_update(
            {"_id": "c", "created": {"$lte": 30}},
            {"$set": {"status": "cancelled"}},
            return_document=ReturnDocument.BEFORE,
        )
        assert before is not None
        assert "succeeded" == before["status"]
        missing = await tasks.find_one_and_update({"_id": "zzz"}, {"$set": {"status": "running"}})
        assert missing is None
        assert 1 == await tasks.count_documents({"status": {"$in": ["waiting", "running"]}})
    finally:
        await client.drop_database(name)
        await client.close()


def _tampered(url: str) -> str:
    """``url`` with its signature (SigV4 ``X-Amz-Signature`` or SigV2 ``Signature``) changed."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    names = {"X-Amz-Signature", "Signature"}
    assert names & {name for name, _ in query}, url
    changed = [(n, "AAAA" + v[4:] if n in names else v) for n, v in query]
    return urlunsplit(parts._replace(query=urlencode(changed)))


@pytest.mark.parametrize("signature", ["default", "s3v4"])
async def test_s3_signed_calls_and_presigned_get(s3_server: S3Info, signature: str) -> None:
    bucket = f"test-{secrets.token_hex(4)}"
    key = "images/u/t_0.png"
    body = secrets.token_bytes(70_000)
    session = aioboto3.Session()
    config = Config(signature_version="s3v4") if signature == "s3v4" else None
    async with session.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
        config=config,
    ) as s3:
        await s3.create_bucket(Bucket=bucket)
        await s3.put_object(Bucket=bucket, Key=key, Body=body)
        got = await s3.get_object(Bucket=bucket, Key=key)
        async with got["Body"] as stream:
            assert body == await stream.read()
        url = await s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=60
        )
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as response:
                assert 200 == response.status
                assert body == await response.read()
            # The signature is checked: a tampered one is refused.
            async with http.get(_tampered(url)) as bad:
                assert 403 == bad.status
        await s3.delete_object(Bucket=bucket, Key=key)
        await s3.delete_bucket(Bucket=bucket)


async def test_s3_refuses_a_wrong_secret(s3_server: S3Info) -> None:
    session = aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key="wrong" + s3_server.secret_key,
        region_name=s3_server.region,
    ) as intruder:
        with pytest.raises(ClientError) as refused:
            await intruder.list_buckets()
    assert "SignatureDoesNotMatch" == refused.value.response["Error"]["Code"]


def _live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (a zombie waits on a reaper only)."""
    return [p.pid for p in processes() if p.pgrp == pgid and p.state != "Z"]


async def _group_gone(pgid: int) -> None:
    """Until group ``pgid`` has no live member (after a SIGKILL went out)."""
    await until(lambda: not _live_members(pgid), f"process group {pgid} gone", timeout_s=5)


async def test_nats_fsyncs_every_write(tmp_path: Path) -> None:
    async with NatsServer(tmp_path, http_port=0) as server, aiohttp.ClientSession() as http:
        assert server.monitor_url is not None
        async with http.get(f"{server.monitor_url}/varz") as response:
            varz = await response.json()
    assert varz["jetstream"]["config"]["sync_always"] is True


@pytest.mark.parametrize("kind", [NatsServer, MongoServer])
async def test_stop_leaves_no_process(kind: type[ManagedServer], tmp_path: Path) -> None:
    server = kind(tmp_path)
    async with server:
        pid = server.pid
        assert pid is not None
        assert _live_members(pid)
    assert server.pid is None
    await _group_gone(pid)
    assert server.log_path.exists()


async def test_two_seaweeds_side_by_side_then_nothing_left(tmp_path: Path) -> None:
    """Every port is chosen free (none of weed's fixed defaults), and stop() cleans up."""
    first, second = SeaweedS3(tmp_path / "a"), SeaweedS3(tmp_path / "b")
    await asyncio.gather(first.start(), second.start())
    try:
        assert not set(first.ports.values()) & set(second.ports.values())
        for server in (first, second):
            async with aioboto3.Session().client(
                "s3",
                endpoint_url=server.endpoint_url,
                aws_access_key_id=server.access_key,
                aws_secret_access_key=server.secret_key,
                region_name=server.region,
            ) as s3:
                assert [] == (await s3.list_buckets())["Buckets"]
        pids = [first.pid, second.pid]
    finally:
        await asyncio.gather(first.stop(), second.stop())
    for pid in pids:
        assert pid is not None
        await _group_gone(pid)
    ports = {p for s in (first, second) for p in (*s.ports.values(), *s.grpc_ports.values())}
    assert [] == _weed_sockets(ports)


def _weed_sockets(ports: set[int]) -> list[Path]:
    return [
        p
        for p in Path("/tmp").glob("seaweedfs-*.sock")
        if p.stem.rsplit("-", 1)[-1] in {str(port) for port in ports}
    ]


class _Stubborn(ManagedServer):
    """Ignores SIGTERM and forks a grandchild that does too: only SIGKILL of the group works."""

    name = "stubborn"
    stop_grace_s = 0.5

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.ready_file = self.data_dir / "ready"

    def command(self) -> list[str]:
        script = (
            "import os, signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "child = subprocess.Popen([sys.executable, '-c', "
            "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "time.sleep(600)'])\n"
            f"open({str(self.ready_file)!r}, 'w').write(str(child.pid))\n"
            "print('stubborn up', flush=True)\n"
            "time.sleep(600)\n"
        )
        return [sys.executable, "-c", script]

    async def ready(self) -> bool:
        return self.ready_file.exists() and self.ready_file.read_text() != ""


async def test_stop_kills_a_stubborn_process_group(tmp_path: Path) -> None:
    server = _Stubborn(tmp_path)
    await server.start()
    pid = server.pid
    assert pid is not None
    grandchild = int(server.ready_file.read_text())
    assert grandchild in _live_members(pid)
    await server.stop()
    await _group_gone(pid)
    assert grandchild not in _live_members(pid)
    assert "stubborn up" in server.tail_log(5)


# Issue 15, item 6: a taken port is an error when asked for, and children die with
# their parent however it dies.


async def test_a_taken_nats_port_asked_for_is_a_clear_error(tmp_path: Path) -> None:
    async with NatsServer(tmp_path / "first") as first:
        second = NatsServer(tmp_path / "second", port=first.port)
        with pytest.raises(PortInUseError, match=f"NATS port {first.port} .* already in use"):
            await second.start()
        assert second.pid is None, "nothing was started"
        client = await nats.connect(first.url)  # the first one is untouched
        await client.close()


async def test_a_taken_mongodb_port_asked_for_is_a_clear_error(
    tmp_path: Path, mongo_server: MongoInfo
) -> None:
    port = int(mongo_server.url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(PortInUseError, match=f"MongoDB port {port}"):
        await MongoServer(tmp_path, port=port).start()


def test_a_taken_port_not_asked_for_is_replaced_by_a_free_one() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert not port_free("127.0.0.1", port)
        other = claim_port("NATS", "127.0.0.1", port, asked=False)
        assert other != port
        assert port_free("127.0.0.1", other)
        with pytest.raises(PortInUseError):
            claim_port("NATS", "127.0.0.1", port, asked=True)


REPO = Path(__file__).resolve().parents[2]
PARENT = """
import asyncio, sys
from pathlib import Path
from services.common.servers import NatsServer

async def main():
    server = NatsServer(Path(sys.argv[1]))
    await server.start()
    print(server.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_server_dies_with_its_parent_on_kill_9(tmp_path: Path) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PARENT,
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert parent.stdout is not None
    line = await asyncio.wait_for(parent.stdout.readline(), 60)
    child = int(line)
    assert _live_members(child)
    parent.kill()  # SIGKILL: no cleanup code of the parent runs
    await parent.wait()
    await until(lambda: not _live_members(child), "nats-server gone with its parent's kill -9")


async def test_result_urls_are_signed_for_the_public_s3_endpoint(s3_server: S3Info) -> None:
    """Services reach S3 at one address, clients at another: the URL must be signed for
    the clients' host (SigV4 signs it), not have its host swapped afterwards."""
    inside = s3_server.endpoint_url
    public = inside.replace("127.0.0.1", "localhost")
    assert public != inside
    settings = StoreSettings(
        s3_endpoint_url=inside,
        s3_public_url=public,
        s3_bucket=f"test-{secrets.token_hex(4)}",
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
    )
    store = await open_object_store(settings)
    try:
        await store.put("images/u/t_1.png", b"png bytes")
        url = await store.presign("images/u/t_1.png", 60)
        assert url.startswith(public + "/"), url
        swapped = url.replace(public, inside)  # what rewriting the host would give
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as response:
                assert (200, b"png bytes") == (response.status, await response.read())
            async with http.get(swapped) as wrong:
                assert 403 == wrong.status, "the host is part of the signature"
    finally:
        await store.aclose()
