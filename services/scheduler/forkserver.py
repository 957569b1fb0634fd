"""Local workers forked from a server that has already imported torch and diffusers.

Most of a local worker's cold start is imports: on this project's 2-core test machine,
4–6 s of a ~10 s start to the first image with the tiny model (bench/cold_start.py),
before a single weight is read. So the local backend starts its workers from a fork
server, ``python -m services.inference.zygote``, which imports them once; each worker is a
fork of it, those imports done (``SDSWARM_WORKER_PRELOAD``, on by default; off: a fresh
``python -m services.inference`` per worker, as before).

This side starts the server on the first worker's start, asks it for forks one at a time
and learns from it when a worker ends; a forked worker then looks to the backend like a
subprocess (:class:`ForkedWorker`). If the server dies its workers die with it (the
kernel's parent-death signal) and the next start brings up a new server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from typing import Any

from services.common.supervise import die_with_parent

log = logging.getLogger(__name__)
SERVER_COMMAND = [sys.executable, "-m", "services.inference.zygote"]
LINE_LIMIT = 1 << 20
"""A worker's environment travels as one JSON line."""


class ForkedWorker:
    """A forked worker behind the part of ``asyncio.subprocess.Process`` the local
    backend uses (``pid``, ``returncode``, ``send_signal``, ``kill``, ``wait``)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._ended = asyncio.Event()

    def ended(self, code: int) -> None:
        self.returncode = code
        self._ended.set()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        await self._ended.wait()
        assert self.returncode is not None
        return self.returncode


class ForkServer:
    def __init__(self, command: list[str] | None = None) -> None:
        self.command = command or SERVER_COMMAND
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._forked: asyncio.Queue[ForkedWorker | None] = asyncio.Queue()
        self._workers: dict[int, ForkedWorker] = {}
        self._lock = asyncio.Lock()
        self._closing = False

    async def _start(self) -> asyncio.subprocess.Process:
        process = self._process
        if process is not None and process.returncode is None:
            return process
        process = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=LINE_LIMIT,
            preexec_fn=die_with_parent(signal.SIGKILL),
        )
        self._process = process
        self._ready = asyncio.get_running_loop().create_future()
        self._forked = asyncio.Queue()
        self._reader = asyncio.create_task(self._read(process, self._ready))
        log.info("fork server %s started (importing torch and diffusers once)", process.pid)
        return process

    async def _read(self, process: asyncio.subprocess.Process, ready: asyncio.Future[None]) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            try:
                message: dict[str, Any] = json.loads(line)
            except ValueError:
                log.warning("fork server: not a message: %r", line[:200])
                continue
            if message.get("ready"):
                ready.set_result(None)
            elif "pid" in message:
                # Known before its exit can be read, which may be the very next line.
                worker = ForkedWorker(int(message["pid"]))
                self._workers[worker.pid] = worker
                self._forked.put_nowait(worker)
            elif "exit" in message:
                ended = self._workers.pop(int(message["exit"]), None)
                if ended is not None:
                    ended.ended(int(message["code"]))
        code = await process.wait()
        if self._closing:
            log.info("fork server %s stopped", process.pid)
        else:
            log.warning("fork server %s exited with %s; its workers are gone", process.pid, code)
        if not ready.done():
            ready.set_exception(RuntimeError(f"the fork server exited with {code}"))
        for worker in self._workers.values():  # killed by the kernel with the server
            worker.ended(-signal.SIGKILL)
        self._workers.clear()
        self._forked.put_nowait(None)

    async def _started(self) -> asyncio.subprocess.Process:
        """The server, started and its imports done (with the lock held)."""
        process = await self._start()
        assert self._ready is not None
        await self._ready
        return process

    async def ready(self) -> None:
        """Started, its imports done."""
        async with self._lock:
            await self._started()

    async def fork(
        self, env: dict[str, str], log_path: str, script: list[str] | None = None
    ) -> ForkedWorker:
        """A worker with ``env`` as its environment, its output appended to ``log_path``
        (``script``: a Python file and its arguments to run instead, for benches)."""
        async with self._lock:
            process = await self._started()
            assert process.stdin is not None
            request = {"env": env, "log": log_path, **({"script": script} if script else {})}
            process.stdin.write(json.dumps(request).encode() + b"\n")
            await process.stdin.drain()
            worker = await self._forked.get()
            if worker is None:
                raise RuntimeError("the fork server exited before forking")
            return worker

    async def aclose(self) -> None:
        """Stop the server (after the backend has stopped its workers)."""
        process = self._process
        if process is None:
            return
        self._closing = True
        if process.returncode is None and process.stdin is not None:
            process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._reader is not None:
            await self._reader
        self._process = None
        self._closing = False
