"""Hostile input costs nothing: a corpus of 500+ generated and hand-written bad requests,
then a schemathesis run against ``/openapi.json``. Pass = no 5xx, the gateway still
healthy, and no task document, queued message or worker for any refused request."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import os
import struct
import sys
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from proto import names
from services.common import bus
from services.common.bus import worker_records
from tests.system import System, SystemFactory

pytestmark = pytest.mark.e2e
BASE: dict[str, Any] = {
    "stable_diffusion_model": "tiny.safetensors",
    "prompt": "x",
    "steps": 1,
    "width": 64,
    "height": 64,
}
# Values no field accepts as they are, or that break a rule or a limit of the field.
HOSTILE_VALUES: list[Any] = [
    None,
    [],
    {},
    {"$gt": ""},
    {"$where": "sleep(1000)"},
    True,
    -(2**70),
    2**70,
    1e308,
    -1e308,
    "x" * 100_000,
    "../../etc/passwd",
    "\u0000",
    "{{7*7}}",
    [[[[[[[[[[[]]]]]]]]]]],
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]
FIELDS = [
    "stable_diffusion_model",
    "steps",
    "width",
    "height",
    "seed",
    "cfg_scale",
    "batch_size",
    "n_iter",
    "sampler_name",
    "override_settings",
    "styles",
    "denoising_strength",
    "eta",
    "subseed_strength",
    "webhook",
    "prompt",
]
# Some hostile values are legal for a free-text field (a prompt may say "{{7*7}}"): those
# requests are accepted, and must create exactly their task.
_LEGAL: list[tuple[str, Any]] = [
    ("prompt", "../../etc/passwd"),
    ("prompt", "{{7*7}}"),
    ("prompt", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"),
    ("prompt", "\u0000"),
    ("sampler_name", None),
    ("override_settings", {}),
    ("override_settings", None),
    ("styles", []),
    ("webhook", None),
    ("denoising_strength", None),
    ("eta", None),
]
MAY_ACCEPT = {(field, json.dumps(value)) for field, value in _LEGAL}


@dataclass(frozen=True)
class Attack:
    name: str
    method: str
    path: str
    body: bytes
    content_type: str = "application/json"


def _png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims 10 gigapixels (a few bytes of data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


def corpus() -> Iterator[Attack]:
    for path, (field, value) in itertools.product(
        ("/txt2img", "/sdapi/v1/txt2img"), itertools.product(FIELDS, HOSTILE_VALUES)
    ):
        if (field, json.dumps(value)) in MAY_ACCEPT:
            continue
        if path.startswith("/sdapi") and field == "stable_diffusion_model":
            continue  # not a field of A1111's API: ignored there, as A1111 does
        body = {**BASE, field: value}
        if path.startswith("/sdapi"):
            body.pop("stable_diffusion_model")
            body["override_settings"] = {"sd_model_checkpoint": "tiny.safetensors"}
            if field == "override_settings":
                body["override_settings"] = value
        yield Attack(f"{path} {field}={str(value)[:20]!r}", "POST", path, json.dumps(body).encode())
    png = _tiny_png()
    images: dict[str, Any] = {
        "bomb": base64.b64encode(_png_bomb()).decode(),
        "truncated": base64.b64encode(png[: len(png) // 2]).decode(),
        "gif": base64.b64encode(b"GIF89a" + b"\0" * 32).decode(),
        "not base64": "%%%not-base64%%%",
        "data url not base64": "data:image/png,abcd",
        "traversal": "images/someone-else/../../etc/passwd",
        "absolute": "/etc/passwd",
        "encoded traversal": "images/default/%2e%2e/%2e%2e/x.png",
        "unicode dots": "images/default/\uff0e\uff0e/x.png",
        "other user's key": "images/alice/abc_1.png",
        "number": 12,
        "nested": {"$ne": None},
    }
    for (label, image), path in itertools.product(
        images.items(), ("/img2img", "/sdapi/v1/img2img")
    ):
        # Strength 1: the one step runs, so the image (not the step count) is what is judged.
        body = {**BASE, "init_images": [image], "denoising_strength": 1.0}
        if path.startswith("/sdapi"):
            body.pop("stable_diffusion_model")
            body["override_settings"] = {"sd_model_checkpoint": "tiny.safetensors"}
        yield Attack(f"{path} init_images {label}", "POST", path, json.dumps(body).encode())
        yield Attack(
            f"{path} mask {label}",
            "POST",
            path,
            json.dumps(
                {**body, "init_images": [base64.b64encode(png).decode()], "mask": image}
            ).encode(),
        )
    raw_bodies = {
        "not json": b"{not json",
        "json array": b"[1, 2, 3]",
        "NaN": b'{"stable_diffusion_model": "tiny.safetensors", "steps": NaN}',
        "Infinity": b'{"stable_diffusion_model": "tiny.safetensors", "cfg_scale": Infinity}',
        "deep nesting": b'{"override_settings": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "empty": b"",
        "binary": os.urandom(256),
        "utf-16": json.dumps(BASE).encode("utf-16"),
        "huge": b'{"prompt": "' + b"a" * (40 * 1024 * 1024) + b'"}',
    }
    for (label, raw), path in itertools.product(
        raw_bodies.items(),
        (
            "/txt2img",
            "/img2img",
            "/sdapi/v1/txt2img",
            "/options",
            "/login",
            "/models",
            "/sdapi/v1/options",
            "/batch_update_sd_resource",
            "/sdapi/v1/png-info",
        ),
    ):
        if label == "huge" and path not in ("/txt2img", "/sdapi/v1/txt2img"):
            continue
        yield Attack(f"{path} {label}", "POST", path, raw)
    for label, path in {
        "task id traversal": "/tasks/..%2F..%2Fetc/result",
        "task id operator": "/tasks/%7B%22%24gt%22%3A%22%22%7D/result",
        "task id too long": "/tasks/" + "a" * 5000 + "/progress",
        "file traversal": "/files/..%2F..%2Fetc%2Fpasswd?expires=9999999999&signature=x",
        "file unsigned": "/files/images/default/x.png",
        "model traversal": "/models/..%2F..%2Fetc%2Fpasswd",
        # Integers in queries: non-ASCII digits, 5000 digits, beyond 64 bits (issue 15).
        "limit superscript": "/tasks?limit=%C2%B2",
        "limit arabic digit": "/tasks?limit=%D9%A3",
        "limit 5000 digits": "/tasks?limit=" + "1" * 5000,
        "expires 5000 digits": "/files/images/default/x.png?signature=x&expires=" + "9" * 5000,
        "expires superscript": "/files/images/default/x.png?signature=x&expires=%C2%B2",
        "expires 2^64": f"/files/images/default/x.png?signature=x&expires={2**64}",
        "model below a file": "/models/tiny.safetensors/x.safetensors",
    }.items():
        yield Attack(f"GET {label}", "GET", path, b"")
    models: dict[str, dict[str, Any]] = {
        "ossPath traversal": {"type": "lora", "name": "x", "ossPath": "../../etc/passwd"},
        "name traversal": {"type": "lora", "name": "../../x", "ossPath": "uploads/x.safetensors"},
        "unknown type": {"type": "virus", "name": "x", "ossPath": "uploads/x"},
        "operator name": {"type": "lora", "name": {"$gt": ""}, "ossPath": "uploads/x"},
    }
    for label, body in models.items():
        yield Attack(f"POST /models {label}", "POST", "/models", json.dumps(body).encode())
    for label, name in {
        "upload hidden": ".hidden.safetensors",
        "upload traversal": "..%2F..%2Fescape.safetensors",
        "upload pickle": "evil.ckpt",
        "upload not safetensors": "notes.safetensors",
        "upload below a file": "tiny.safetensors/x.safetensors",
    }.items():
        yield Attack(
            f"PUT {label}",
            "PUT",
            f"/models/{name}",
            b"plain text, not a model",
            "application/octet-stream",
        )


@pytest.fixture(scope="module")
async def system(make_system: SystemFactory) -> AsyncIterator[System]:
    # A models folder of its own: the fuzzer may delete or replace models (DELETE and PUT
    # /models are in the OpenAPI document), which must not reach other tests' systems.
    # One system for both tests: the corpus (first) counts on a fresh one; the fuzzer
    # (second) on nothing but the server staying up.
    async with make_system(
        models=make_system.models(),
        max_steps=2,
        max_width=64,
        max_height=64,
        max_batch_size=1,
        max_n_iter=1,
    ) as system:
        yield system


async def test_hostile_corpus_costs_nothing(system: System) -> None:
    attacks = list(corpus())
    assert len(attacks) >= 500
    accepted: list[str] = []
    server_errors: list[str] = []
    statuses: dict[int, int] = {}
    for n, attack in enumerate(attacks):
        task_id = f"hostile{n:05d}"
        async with system.http.request(
            attack.method,
            system.url + attack.path,
            data=io.BytesIO(attack.body),
            headers={
                "Content-Type": attack.content_type,
                "Request-Type": "async",
                "taskId": task_id,
            },
        ) as response:
            await response.read()
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.status >= 500:
                server_errors.append(f"{attack.name}: {response.status}")
            if os.environ.get("HOSTILE_VERBOSE"):
                print(response.status, attack.name)
            elif response.status < 300 and attack.path.endswith(("txt2img", "img2img")):
                accepted.append(task_id)
    print(f"{len(attacks)} hostile requests: statuses {dict(sorted(statuses.items()))}")
    assert [] == server_errors
    async with system.http.get(f"{system.url}/healthz") as response:
        assert 200 == response.status, "the gateway survived"
    # The corpus names every request's task (`taskId`): chosen ids are kept as `client_id`.
    assert sorted(accepted) == sorted(await system.db["tasks"].distinct("client_id")), (
        "a task document exists exactly for each accepted request"
    )
    nc = await bus.connect(system.nats_url, "hostile-check")
    try:
        info = await nc.jetstream().stream_info(names.TASK_STREAM)
        assert len(accepted) >= info.state.messages, "no message for a refused request"
        if not accepted:
            assert [] == await worker_records(nc.jetstream()), "no worker started"
    finally:
        await nc.close()


async def test_schemathesis_finds_no_server_error(system: System, tmp_path: Path) -> None:
    """Property-based requests from the OpenAPI document, bounded in time; every
    response must match the schema of its status (the handlers encode those Structs)."""
    # The seed's functions routes answer 500 {status: fail} when a named function does
    # not exist (their contract, documented): not a crash there, and its body is still
    # checked against the document (an internal error's body would not match it).
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "[[operations]]\n"
        'include-path-regex = "^/(batch_update_sd_resource|del/sd/functions)$"\n'
        'checks.not_a_server_error.expected-statuses = ["2XX", "4XX", "500"]\n'
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{system.url}/openapi.json",
        "--checks",
        "not_a_server_error,response_schema_conformance",
        "--max-examples",
        "15",
        "--seed",
        "1",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "-H",
        "Request-Type: async",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,  # its example database stays out of the checkout
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), 420)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    report = out.decode(errors="replace")
    print(report[-3000:])
    assert 0 == process.returncode, report[-6000:]
