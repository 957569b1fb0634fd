"""``sdswarm models …``: the registry through the gateway's model API.

``add FILE`` streams the file (``PUT /models/{name}``) with a progress bar on stderr;
the gateway hashes and checks it on the way. ``ls`` and ``rm`` list and delete. The
gateway is ``--url`` (or ``SDSWARM_URL``, default the local ``sdswarm up``), and the
credentials an API key or login token in ``--token`` / ``SDSWARM_TOKEN``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from proto import ModelType
from services.storage.scan import NAMED_BY_PATH

CHUNK = 1024 * 1024
DEFAULT_URL = "http://127.0.0.1:7860"


def add_parser(commands: Any) -> None:
    models = commands.add_parser("models", help="upload, list and delete models")
    models.add_argument("--url", default=os.environ.get("SDSWARM_URL", DEFAULT_URL))
    models.add_argument("--token", default=os.environ.get("SDSWARM_TOKEN", ""))
    actions = models.add_subparsers(dest="action", required=True)
    types = [t.value for t in ModelType]
    add = actions.add_parser("add", help="upload a model file (streamed, sha256-checked)")
    add.add_argument("file", type=Path)
    add.add_argument("--type", choices=types, default=ModelType.STABLE_DIFFUSION.value)
    add.add_argument("--name", help="registered name (default: the file name, A1111 style)")
    ls = actions.add_parser("ls", help="list registered models")
    ls.add_argument("--type", choices=types)
    rm = actions.add_parser("rm", help="delete a model (its queued tasks fail)")
    rm.add_argument("name")
    rm.add_argument("--type", choices=types, default=ModelType.STABLE_DIFFUSION.value)


class Progress:
    """A one-line progress bar (bytes, percent, rate) redrawn at most 10 times a second."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total, self.out, self.done = total, out, 0
        self.started = self.drawn = time.monotonic()

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.drawn >= 0.1 or self.done >= self.total:
            self.drawn = now
            share = self.done / self.total if self.total else 1.0
            rate = self.done / max(now - self.started, 1e-6) / 2**20
            bar = "#" * int(share * 30)
            self.out.write(
                f"\r[{bar:<30}] {share:6.1%} {self.done / 2**20:,.1f} MiB {rate:,.1f} MiB/s"
            )
            self.out.flush()

    def finish(self) -> None:
        self.out.write("\n")
        self.out.flush()


async def _chunks(path: Path, progress: Progress, digest: Any) -> AsyncIterator[bytes]:
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK):
            digest.update(chunk)
            progress.advance(len(chunk))
            yield chunk
    finally:
        handle.close()


def _default_name(model_type: ModelType, path: Path) -> str:
    return path.name if model_type in NAMED_BY_PATH else path.stem


async def _check(response: aiohttp.ClientResponse) -> Any:
    body = await response.json(content_type=None)
    if response.status >= 400:
        message = body.get("message", body) if isinstance(body, dict) else body
        raise SystemExit(f"error {response.status}: {message}")
    return body


async def run_models(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    base = args.url.rstrip("/")
    async with aiohttp.ClientSession(headers=headers) as http:
        match args.action:
            case "add":
                model_type = ModelType(args.type)
                path: Path = args.file
                size = (await asyncio.to_thread(path.stat)).st_size
                name = args.name or _default_name(model_type, path)
                progress = Progress(size, sys.stderr)
                digest = hashlib.sha256()
                query = {"type": model_type.value, "suffix": path.suffix}
                url = f"{base}/models/{urllib.parse.quote(name)}?{urllib.parse.urlencode(query)}"
                async with http.put(
                    url,
                    data=_chunks(path, progress, digest),
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(size),
                    },
                    timeout=aiohttp.ClientTimeout(total=None),
                ) as response:
                    progress.finish()
                    body = await _check(response)
                model = body["model"]
                if model["sha256"] != digest.hexdigest():
                    raise SystemExit("the gateway stored a different file (sha256 mismatch)")
                summary = f"{model['type']} {model['name']}: {model['status']}"
                print(f"{summary}, sha256 {model['sha256']}")
            case "ls":
                query = {"type": args.type} if args.type else {}
                async with http.get(f"{base}/models", params=query) as response:
                    for model in await _check(response):
                        print(
                            f"{model['type']:16} {model['status']:11} {model['family'] or '-':12}"
                            f" {model['name']}"
                        )
            case "rm":
                url = f"{base}/models/{urllib.parse.quote(args.name)}"
                async with http.delete(url, params={"type": args.type}) as response:
                    print(json.dumps(await _check(response)))
    return 0
