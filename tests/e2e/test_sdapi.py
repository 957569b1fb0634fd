"""AUTOMATIC1111 clients, unchanged: the exact JSON they send, A1111's response shapes."""

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

from proto.requests import Txt2ImgRequest
from tests.e2e.gateways import extra_gateway
from tests.system import System
from tests.waiting import eventually, until_read

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("system", ["local"], indirect=True)]

# What a typical A1111 API client (e.g. webuiapi) posts, defaults and all.
A1111_TXT2IMG: dict[str, Any] = {
    "enable_hr": False,
    "denoising_strength": 0.7,
    "firstphase_width": 0,
    "firstphase_height": 0,
    "hr_scale": 2,
    "hr_upscaler": "Latent",
    "hr_second_pass_steps": 0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "prompt": "a red apple on a table",
    "styles": [],
    "seed": 31337,
    "subseed": -1,
    "subseed_strength": 0.0,
    "seed_resize_from_h": 0,
    "seed_resize_from_w": 0,
    "sampler_name": "DPM++ 2M Karras",
    "batch_size": 1,
    "n_iter": 2,
    "steps": 3,
    "cfg_scale": 7.0,
    "width": 64,
    "height": 64,
    "restore_faces": False,
    "tiling": False,
    "do_not_save_samples": False,
    "do_not_save_grid": False,
    "negative_prompt": "",
    "eta": 1.0,
    "s_churn": 0,
    "s_tmax": 0,
    "s_tmin": 0,
    "s_noise": 1,
    "override_settings": {},
    "override_settings_restore_afterwards": True,
    "script_args": [],
    "sampler_index": "Euler a",
    "script_name": None,
    "send_images": True,
    "save_images": False,
    "alwayson_scripts": {},
}


async def _get(system: System, path: str) -> Any:
    async with system.http.get(system.url + path) as response:
        assert 200 == response.status, await response.text()
        return await response.json()


async def test_listing_endpoints(system: System) -> None:
    models = await _get(system, "/sdapi/v1/sd-models")
    assert 1 == len(models)
    assert f"tiny.safetensors [{models[0]['sha256'][:10]}]" == models[0]["title"]
    assert ("tiny", models[0]["sha256"][:10]) == (models[0]["model_name"], models[0]["hash"])
    assert {"title", "model_name", "hash", "sha256", "filename", "config"} == set(models[0])
    samplers = await _get(system, "/sdapi/v1/samplers")
    assert {"Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= {s["name"] for s in samplers}
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    schedulers = await _get(system, "/sdapi/v1/schedulers")
    assert "Karras" in [s["label"] for s in schedulers]
    assert [] == await _get(system, "/sdapi/v1/loras")


async def test_options_choose_the_default_checkpoint(system: System) -> None:
    options = await _get(system, "/sdapi/v1/options")
    assert options["sd_model_checkpoint"].startswith("tiny.safetensors [")
    async with system.http.post(
        f"{system.url}/sdapi/v1/options", json={"sd_model_checkpoint": "missing.safetensors"}
    ) as response:
        assert 404 == response.status
    async with system.http.post(
        f"{system.url}/sdapi/v1/options",
        json={"sd_model_checkpoint": "tiny.safetensors", "CLIP_stop_at_last_layers": 2},
    ) as response:
        assert 200 == response.status
    options = await _get(system, "/sdapi/v1/options")
    assert options["sd_model_checkpoint"].startswith("tiny.safetensors ["), "A1111's title"
    assert 2 == options["CLIP_stop_at_last_layers"]


async def test_a_write_on_one_gateway_shows_at_once_on_another(system: System) -> None:
    """Gateways remember registry and options reads (``SDSWARM_REGISTRY_CACHE_S``); a
    write anywhere is announced on NATS and every gateway forgets. The second gateway
    here remembers for an hour: only the notice can make it see the change."""
    async with extra_gateway(system, registry_cache_s=3600) as other:

        async def clip_skip() -> Any:
            async with system.http.get(f"{other}/sdapi/v1/options") as response:
                assert 200 == response.status, await response.text()
                return (await response.json()).get("CLIP_stop_at_last_layers")

        before = await clip_skip()  # now remembered there
        async with system.http.post(
            f"{system.url}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3}
        ) as response:
            assert 200 == response.status, await response.text()
        assert 3 != before
        await until_read(clip_skip, 3, "the other gateway sees the write", timeout_s=10)


async def test_txt2img_returns_base64_images_parameters_and_info(system: System) -> None:
    async with system.http.post(f"{system.url}/sdapi/v1/txt2img", json=A1111_TXT2IMG) as r:
        assert 200 == r.status, await r.text()
        body = await r.json()
    assert {"images", "parameters", "info"} == set(body)
    assert 2 == len(body["images"])
    for encoded in body["images"]:
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert (64, 64) == image.size
    assert isinstance(body["info"], str), "A1111 sends info as a JSON string"
    info = json.loads(body["info"])
    assert ([31337, 31338], "DPM++ 2M", "Karras") == (
        info["all_seeds"],
        info["sampler_name"],
        info["scheduler"],
    )
    assert "a red apple on a table" == body["parameters"]["prompt"]

    # png-info reads the parameters back out of a result image, as A1111 clients do.
    async with system.http.post(
        f"{system.url}/sdapi/v1/png-info", json={"image": body["images"][1]}
    ) as r:
        assert 200 == r.status, await r.text()
        read_back = await r.json()
    assert info["infotexts"][1] == read_back["info"]
    fields = read_back["parameters"]
    assert ("a red apple on a table", "31338", "3", "64") == (
        fields["Prompt"],
        fields["Seed"],
        fields["Steps"],
        fields["Size-1"],
    )


async def test_progress_and_interrupt_touch_only_the_callers_task(system: System) -> None:
    idle = await _get(system, "/sdapi/v1/progress")
    assert {"progress", "eta_relative", "state", "current_image", "textinfo"} == set(idle)
    slow = {
        **A1111_TXT2IMG,
        "steps": 150,
        "width": 256,
        "height": 256,
        "n_iter": 1,
        "force_task_id": "slow-a1111-task",
    }
    call = asyncio.create_task(system.http.post(f"{system.url}/sdapi/v1/txt2img", json=slow))

    async def stepping() -> dict[str, Any] | None:
        progress = await _get(system, "/sdapi/v1/progress")
        state = progress["state"]
        running = state["job"] == "task(slow-a1111-task)" and state["sampling_step"] >= 2
        return progress if running else None

    progress = await eventually(stepping, "the slow task stepping", timeout_s=120)
    assert 0 < progress["progress"] < 1
    assert 150 == progress["state"]["sampling_steps"]
    async with system.http.post(f"{system.url}/sdapi/v1/interrupt") as response:
        assert 200 == response.status
    async with await call as response:
        assert 409 == response.status
        assert "cancelled" == (await response.json())["code"]


async def test_seed_task_headers_on_the_a1111_routes(system: System) -> None:
    """The seed's passthrough: `Task-Flag: true` + `taskId` + `Request-Type: async`."""
    body = {
        **A1111_TXT2IMG,
        "n_iter": 1,
        "override_settings": {"sd_model_checkpoint": "tiny.safetensors"},
    }
    headers = {"Task-Flag": "true", "taskId": "seed-flagged-1", "Request-Type": "async"}
    async with system.http.post(f"{system.url}/sdapi/v1/txt2img", json=body, headers=headers) as r:
        assert 202 == r.status, await r.text()
        assert "seed-flagged-1" == r.headers["taskId"]
        assert {"taskId": "seed-flagged-1", "status": "waiting"} == await r.json()
    done = await system.succeeded("seed-flagged-1")
    async with system.http.get(f"{system.url}/tasks/{done['_id']}/result") as r:
        result = await r.json()
    assert ("succeeded", 1) == (result["status"], len(result["images"]))


async def test_prompt_styles_from_the_a1111_styles_file(system: System) -> None:
    styles = Path(system.settings.models_dir) / "styles.csv"
    styles.write_text(
        "name,prompt,negative_prompt\n"
        'cinematic,"film still of {prompt}, dramatic light",blurry\n'
        "sharp,highly detailed,\n"
    )
    async with system.http.get(f"{system.url}/sdapi/v1/prompt-styles") as r:
        listed = await r.json()
    assert ["cinematic", "sharp"] == [s["name"] for s in listed]
    assert "blurry" == listed[0]["negative_prompt"]

    body = {
        "stable_diffusion_model": "tiny.safetensors",
        "prompt": "a fox",
        "negative_prompt": "text",
        "styles": ["cinematic", "sharp"],
        "steps": 1,
        "width": 64,
        "height": 64,
    }
    task_id = await system.submit(body)
    sent = (await system.command(task_id)).request
    assert isinstance(sent, Txt2ImgRequest)
    assert "film still of a fox, dramatic light, highly detailed" == sent.prompt
    assert "text, blurry" == sent.negative_prompt
    async with system.http.post(
        f"{system.url}/txt2img",
        json={**body, "styles": ["nope"]},
        headers={"Request-Type": "async"},
    ) as r:
        refused = await r.json()
        assert (422, "styles[0]") == (r.status, refused["field"])
    await system.succeeded(task_id)


async def test_memory_reports_host_and_workers(system: System) -> None:
    settings = {"sd_model_checkpoint": "tiny.safetensors"}
    body = {**A1111_TXT2IMG, "n_iter": 1, "override_settings": settings}
    async with system.http.post(f"{system.url}/sdapi/v1/txt2img", json=body) as r:
        assert 200 == r.status, await r.text()
    async with system.http.get(f"{system.url}/sdapi/v1/memory") as r:
        memory = await r.json()
    assert 0 < memory["ram"]["used"] < memory["ram"]["total"]
    assert memory["workers"], "the worker that ran the task reports itself"
    assert all(w["rss"] > 50 * 2**20 for w in memory["workers"]), "torch alone is more"
    assert "error" in memory["cuda"], "no CUDA on this machine"


async def test_skip_ends_the_current_job_and_progress_says_skipped(system: System) -> None:
    """A1111's skip: the running job (of n_iter) ends, progress says ``skipped`` until the
    next job starts, and the result holds only the next job's images."""
    body = {
        **A1111_TXT2IMG,
        "steps": 40,
        "width": 256,
        "height": 256,
        "n_iter": 2,
        "seed": 100,
        "sampler_name": "Euler",
        "force_task_id": "skipped-a1111-task",
    }
    call = asyncio.create_task(system.http.post(f"{system.url}/sdapi/v1/txt2img", json=body))
    await system.task_when(
        "skipped-a1111-task",
        lambda d: (
            (d["progress"]["job_no"], d["status"]) == (0, "running") and d["progress"]["step"] >= 2
        ),
    )
    async with system.http.post(f"{system.url}/sdapi/v1/skip") as response:
        assert 200 == response.status
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        seed, a1111 = await asyncio.gather(
            _get(system, "/tasks/skipped-a1111-task/progress"),
            _get(system, "/sdapi/v1/progress?id_task=skipped-a1111-task"),
        )
        seen += [seed["state"], a1111["state"]]
        if seed["state"]["job_no"] == 1 or seed["status"] != "running":
            break
    skipped = [state for state in seen if state["skipped"]]
    print(f"{len(skipped)} of {len(seen)} progress reads after the skip said skipped")
    assert skipped, "progress said skipped between the skip and the next job"
    assert {0} == {state["job_no"] for state in skipped}, "the skipped job is the first"
    async with await call as response:
        assert 200 == response.status, await response.text()
        answer = await response.json()
    assert 1 == len(answer["images"]), "only the second job's image"
    with Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))) as image:
        assert "Seed: 101" in image.info["parameters"], "the image is the second job's"
    progress = await _get(system, "/tasks/skipped-a1111-task/progress")
    assert (False, 1) == (progress["state"]["skipped"], progress["state"]["job_no"])


async def test_overrides_kept_when_not_restored_afterwards(system: System) -> None:
    body = {**A1111_TXT2IMG, "n_iter": 1, "steps": 2}
    for restore, marker in ((True, "restored"), (False, "kept")):
        async with system.http.post(
            f"{system.url}/sdapi/v1/txt2img",
            json={
                **body,
                "override_settings": {"sdswarm_test_marker": marker},
                "override_settings_restore_afterwards": restore,
            },
        ) as response:
            assert 200 == response.status, await response.text()
    assert "kept" == (await _get(system, "/sdapi/v1/options"))["sdswarm_test_marker"]
