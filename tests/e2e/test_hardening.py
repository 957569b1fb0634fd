"""Issue 15 (hardening, gateway side): each test reproduces a defect a hostile client
found, on the whole system with its real servers."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.e2e.gateways import extra_gateway
from tests.system import System

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("system", ["local"], indirect=True)]

MODEL = "tiny.safetensors"
BASE: dict[str, Any] = {"stable_diffusion_model": MODEL, "prompt": "x", "steps": 1}
ODD_NUMBERS = ["²", "٣", "1" * 5000, str(2**64), "-1", "1e3", " 7", "0x10", "１"]


async def _json(system: System, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with system.http.request(method, system.url + path, **kwargs) as response:
        text = await response.text()
        return response.status, (json.loads(text) if text.startswith("{") else text)


async def test_odd_numbers_are_4xx_naming_the_field(system: System) -> None:
    """Item 9: non-ASCII digits, 5000 digits or 2^64 in a query, header or path were 500s."""
    task_id = await system.submit({**BASE, "width": 64, "height": 64})
    for value in ODD_NUMBERS:
        status, body = await _json(system, "GET", "/tasks", params={"limit": value})
        assert (422, "limit") == (status, body["field"]), (value, body)
        status, body = await _json(
            system,
            "GET",
            "/files/images/default/x.png",
            params={"expires": value, "signature": "x"},
        )
        assert (422, "expires") == (status, body["field"]), (value, body)
        if value != value.strip():
            continue  # HTTP strips a header value's spaces
        status, body = await _json(
            system, "GET", f"/tasks/{task_id}/events", headers={"Last-Event-ID": value}
        )
        assert (422, "Last-Event-ID") == (status, body["field"]), (value, body)
    # The largest accepted values still work.
    status, _ = await _json(system, "GET", "/tasks", params={"limit": "100"})
    assert 200 == status


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_a_model_name_with_a_path_under_a_file_is_4xx(system: System, method: str) -> None:
    """Item 9: a model name naming a path below an existing file was a 500."""
    # (A `..` never arrives: clients normalise it away, and names refuse it anyway.)
    for name in (f"{MODEL}/x", f"{MODEL}/x.safetensors", f"{MODEL}/sub/x.safetensors"):
        status, body = await _json(
            system,
            method,
            f"/models/{name}",
            data=b"not a model",
            headers={"Content-Type": "application/octet-stream"},
        )
        assert 400 <= status < 500, (name, status, body)
    status, body = await _json(
        system,
        "POST",
        "/models",
        json={"type": "stableDiffusion", "name": f"{MODEL}/x.safetensors", "ossPath": "u/x"},
    )
    assert 400 <= status < 500, (status, body)


def _png(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def test_decoding_input_images_does_not_block_the_loop(system: System) -> None:
    """Item 3: four 4096² PNGs in an img2img that is then refused (its mask does not match)
    were decoded on the event loop (~1.3 s during which nothing else was served)."""
    big = _png((4096, 4096))
    body = {**BASE, "steps": 4, "width": 64, "height": 64, "init_images": [big] * 4}
    body["mask"] = _png((8, 8))
    latencies: list[float] = []

    async def probe(stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            async with system.http.get(f"{system.url}/healthz") as response:
                assert 200 == response.status
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.01)

    async def refused() -> None:
        status, answer = await _json(system, "POST", "/img2img", json=body)
        assert (422, "mask") == (status, answer["field"])

    stop = asyncio.Event()
    prober = asyncio.create_task(probe(stop))
    await asyncio.gather(*(refused() for _ in range(3)))
    stop.set()
    await prober
    worst = max(latencies) * 1000
    print(
        f"/healthz during 3 img2img of 4×4096² PNGs: worst {worst:.0f} ms, {len(latencies)} probes"
    )
    assert len(latencies) >= 5
    assert worst < 600


ADMIN_KEY, USER_KEY = "admin-key-0123456789", "user-key-01234567890"


async def test_non_admins_see_no_server_paths_ram_or_workers(system: System) -> None:
    """Item 12: any user saw absolute server paths (`ossPath`, `filename`), the host's RAM
    and the workers' names."""
    await _json(system, "POST", "/txt2img", json={**BASE, "width": 64, "height": 64})  # a worker
    root = str(await asyncio.to_thread(Path(system.settings.models_dir).resolve))
    routes = [
        "/models",
        f"/models/{MODEL}",
        "/models?type=lora",
        "/sdapi/v1/sd-models",
        "/sdapi/v1/sd-vae",
        "/sdapi/v1/loras",
        "/sdapi/v1/upscalers",
    ]
    async with extra_gateway(
        system, api_keys=[f"root:{ADMIN_KEY}", f"user:{USER_KEY}"], admins=["root"]
    ) as url:
        for route in routes:
            for key, sees_paths in ((USER_KEY, False), (ADMIN_KEY, True)):
                headers = {"Authorization": f"Bearer {key}"}
                async with system.http.get(url + route, headers=headers) as response:
                    assert 200 == response.status, route
                    text = await response.text()
                if "tiny" in text:
                    assert sees_paths == (root in text), (route, key, text)
        async with system.http.get(
            f"{url}/sdapi/v1/sd-models", headers={"Authorization": f"Bearer {USER_KEY}"}
        ) as response:
            assert "Stable-diffusion/tiny.safetensors" == (await response.json())[0]["filename"]
        memory = {}
        for key in (USER_KEY, ADMIN_KEY):
            async with system.http.get(
                f"{url}/sdapi/v1/memory", headers={"Authorization": f"Bearer {key}"}
            ) as response:
                memory[key] = await response.json()
        assert "error" in memory[USER_KEY]["ram"]
        assert "workers" not in memory[USER_KEY]
        assert memory[ADMIN_KEY]["ram"]["total"] > 0
        assert memory[ADMIN_KEY]["workers"], "the admin sees the workers"


@pytest.mark.parametrize(
    "host",
    ["2002:a00:1::1", "2002:a9fe:a9fe::1", "64:ff9b::a00:1", "::ffff:a00:1", "::a00:1"],
)
async def test_webhooks_to_ipv4_inside_ipv6_private_addresses_are_refused(
    system: System, host: str
) -> None:
    """Item 12: a 6to4 address (2002::/16) wrapping a private IPv4 passed the public-address
    check; so would NAT64, mapped and compatible forms."""
    async with extra_gateway(system, webhook_allow_hosts=[host]) as url:
        webhook = {"url": f"https://[{host}]/hook", "events": ["completed"]}
        async with system.http.post(
            f"{url}/txt2img",
            json={**BASE, "width": 64, "height": 64, "webhook": webhook},
            headers={"Request-Type": "async"},
        ) as response:
            answer = await response.json()
    assert (422, "webhook.url") == (response.status, answer["field"]), answer
    assert "non-public address" in answer["message"]


async def _refused(
    system: System, url: str, path: str, body: Any, status: int, field: str
) -> dict[str, Any]:
    before = await system.db["tasks"].count_documents({})
    async with system.http.post(
        url + path,
        data=io.BytesIO(json.dumps(body).encode()),
        headers={"Request-Type": "async", "Content-Type": "application/json"},
    ) as response:
        answer: dict[str, Any] = await response.json()
    assert (status, field) == (response.status, answer.get("field")), (path, answer)
    assert before == await system.db["tasks"].count_documents({}), "nothing stored"
    return answer


async def test_free_form_fields_are_bounded(system: System) -> None:
    """Item 2: a 1.2 MB `comments` was answered 202 and never queued (larger than NATS's
    max payload): the task stayed waiting forever. Every free-form field is bounded."""
    url = system.url
    request = {**BASE, "width": 64, "height": 64}
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/txt2img", {"comments": {"x": "a" * 1_200_000}}, "comments.x"),
        ("/txt2img", {"comments": {f"k{n}": "v" * 100 for n in range(1000)}}, "comments"),
        ("/txt2img", {"override_settings": {"x": ["y" * 1000] * 100}}, "override_settings"),
        ("/txt2img", {"styles": ["s" * 30_000]}, "styles[0]"),
        ("/txt2img", {"sampler_name": "e" * 30_000}, "sampler_name"),
        (
            "/txt2img",
            {"alwayson_scripts": {"a": {"args": ["z" * 70_000]}}},
            "alwayson_scripts.a.args[0]",
        ),
        ("/sdapi/v1/txt2img", {"script_args": ["q"] * 20_000, **_CHECKPOINT}, "script_args"),
    ]
    for path, extra, field in cases:
        answer = await _refused(system, url, path, {**request, **extra}, 422, field)
        assert "limit_exceeded" == answer["code"]
    big_options = {f"k{n}": "o" * 17_000 for n in range(4)}  # 68 000 bytes, each < 20 000
    for path, body, field in (
        ("/options", {"data": big_options}, "data"),
        ("/sdapi/v1/options", big_options, "options"),
    ):
        await _refused(system, url, path, body, 422, field)
    # A request's overrides become the caller's options: the sum stays bounded too.
    half = {f"o{n}": "o" * 19_000 for n in range(2)}
    async with system.http.post(f"{url}/options", json={"data": half}) as response:
        assert 200 == response.status
    overrides: dict[str, Any] = {
        "override_settings": {f"r{n}": "r" * 19_000 for n in range(2)},
        "override_settings_restore_afterwards": False,  # A1111: keep them as settings
    }
    await _refused(system, url, "/txt2img", {**request, **overrides}, 422, "override_settings")
    async with system.http.post(f"{url}/options", json={"data": {}}) as response:
        assert 200 == response.status


_CHECKPOINT = {"override_settings": {"sd_model_checkpoint": MODEL}}


async def test_a_command_larger_than_nats_max_payload_is_refused(system: System) -> None:
    """Item 2, the case itself: with the field limits raised, 1.2 MB of `comments` still
    never gives a task that cannot be queued: 413 naming the field, nothing stored."""
    raised = {
        "max_text_chars": 10**7,
        "max_free_form_bytes": 10**8,
        "max_command_bytes": 10**8,
    }
    async with extra_gateway(system, **raised) as url:
        body = {**BASE, "width": 64, "height": 64, "comments": {"x": "a" * 1_200_000}}
        answer = await _refused(system, url, "/txt2img", body, 413, "comments")
        assert "command_too_large" == answer["code"]
    async with extra_gateway(system, max_command_bytes=3000) as url:
        body = {**BASE, "width": 64, "height": 64, "prompt": "p" * 5000}
        await _refused(system, url, "/txt2img", body, 413, "prompt")
        # Within bounds, the same route queues the task as before.
        async with system.http.post(
            f"{url}/txt2img",
            json={**BASE, "width": 64, "height": 64},
            headers={"Request-Type": "async"},
        ) as response:
            assert 202 == response.status


async def test_slow_request_bodies_time_out(system: System) -> None:
    """Item 4: bodies had no read timeout (20 unauthenticated 30 MiB bodies held open for
    a minute and more). A body still incomplete after the timeout → 408, connection freed."""
    async with extra_gateway(system, body_read_timeout_s=1.0) as url:
        port = int(url.rsplit(":", 1)[1])
        for method, path in (
            ("POST", "/txt2img"),
            ("POST", "/login"),
            ("POST", "/sdapi/v1/options"),
            ("PUT", "/models/slow.safetensors?type=lora"),  # streamed: an idle timeout
        ):
            kind = "application/json" if method == "POST" else "application/octet-stream"
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
                f'Content-Length: {30 * 2**20}\r\n\r\n{{"prompt": "'.encode()
            )
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 10)
            assert b" 408 " in status_line, (path, status_line)
            assert time.monotonic() - started < 5
            writer.close()
    assert await system.db["models"].find_one({"name": "slow"}) is None
