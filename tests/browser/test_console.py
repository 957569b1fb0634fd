"""The web console, driven in a real headless Chromium against the whole system.

One system and one browser for the module (``console`` fixture); each test signs in as
the user it needs. Every page is also saved as a screenshot (``test-artifacts/browser``).
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from selenium.webdriver import Chrome as WebDriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.support.ui import Select

from proto.commands import Img2ImgTask, Txt2ImgTask
from services.storage.users import UserStore
from tests.browser.conftest import ADMIN, MODEL, PASSWORD, USER, Console

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

UPLOADED = "uploaded.safetensors"


def _generate(console: Console, *, model: str = MODEL, steps: int = 3, size: int = 64) -> str:
    """Fill the playground's sampling fields, press Generate; the task id it shows."""
    option = f'[name=stable_diffusion_model] option[value="{model}"]'
    console.wait(lambda d: d.find_elements("css selector", option))  # the lists load after sign-in
    Select(console.find("[name=stable_diffusion_model]")).select_by_value(model)
    for name, value in (("steps", steps), ("width", size), ("height", size), ("seed", 7)):
        field = console.find(f"#gen-form [name={name}]")
        field.clear()
        field.send_keys(str(value))
    before = console.find("#task-id").text
    console.find("#generate").click()
    console.wait(lambda d: d.find_element("css selector", "#task-id").text not in ("", before))
    task_id: str = console.find("#task-id").text
    return task_id


def _succeeded(console: Console) -> None:
    console.text_of("#task-status", "succeeded")
    console.wait(
        lambda d: d.execute_script("return document.querySelector('#images img')?.naturalWidth")
    )


async def _token(console: Console, user: str) -> str:
    async with console.system.http.post(
        f"{console.url}/login", json={"userName": user, "password": PASSWORD}
    ) as response:
        assert 200 == response.status
        token: str = (await response.json())["token"]
    return token


async def test_sign_in_is_labelled_responsive_and_themed(console: Console) -> None:
    def check() -> dict[str, Any]:
        driver = console.driver
        driver.get(console.url + "/")
        console.visible("#login-form")
        console.screenshot("sign-in")
        console.sign_in(USER)
        # Every form control on every page has a label (or an aria-label).
        unlabelled = driver.execute_script(
            "return [...document.querySelectorAll('input, select, textarea')]"
            ".filter(e => !e.labels?.length && !e.getAttribute('aria-label'))"
            ".map(e => e.name || e.id)"
        )
        light = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
        driver.execute_cdp_cmd(
            "Emulation.setEmulatedMedia",
            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
        )
        dark = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
        console.screenshot("playground-dark")
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        driver.set_window_size(390, 844)  # a phone
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        console.screenshot("playground-phone")
        driver.set_window_size(1280, 1000)
        return {"unlabelled": unlabelled, "light": light, "dark": dark, "overflow": overflow}

    seen = await console.run(check)
    assert [] == seen["unlabelled"]
    assert "rgb(246, 247, 249)" == seen["light"]
    assert "rgb(18, 20, 23)" == seen["dark"]
    assert 0 == seen["overflow"]


async def test_wrong_password_api_key_and_an_ended_session(console: Console) -> None:
    key = await UserStore(console.system.db).create_api_key(USER, "browser test")

    def flow() -> tuple[str, str, bool]:
        console.driver.get(console.url + "/console/console.css")
        console.driver.execute_script("sessionStorage.clear()")
        console.driver.get(console.url + "/")
        console.visible("#login-form [name=userName]").send_keys(USER)
        console.find("#login-form [name=password]").send_keys("not the password\n")
        # The refusal itself, not any notice: the sign-in must be over before the key
        # is tried (its answer would otherwise clear the key's session).
        refused = "Sign-in failed: unknown user or wrong password"
        console.text_of("#notice", refused)
        console.find("#key-form [name=key]").send_keys(key + "\n")
        console.wait(lambda d: d.find_element("css selector", "#who").text == "API key")
        console.go("gallery")
        # The credential stops working (expired, revoked): the console asks to sign in again.
        console.driver.execute_script("sessionStorage.setItem('sdswarm.token', 'revoked')")
        console.driver.execute_script("location.hash = '#models'")
        console.visible("#login-form")
        ended = "Your session has ended: please sign in again."
        console.text_of("#notice", ended)
        console.sign_in(USER)
        console.find("#sign-out").click()
        console.visible("#login-form")
        return refused, console.find("#who").text, console.find("#nav").is_displayed()

    refused, who, nav = await console.run(flow)
    assert "Sign-in failed: unknown user or wrong password" == refused
    assert ("", False) == (who, nav)


async def test_non_administrator_does_not_see_operations(console: Console) -> None:
    def check() -> tuple[bool, bool, bool]:
        console.sign_in(USER)
        link_shown = console.find("#nav-operations").is_displayed()
        console.driver.get(console.url + "/#operations")
        console.visible("#page-playground")  # sent back to the playground
        return (
            link_shown,
            console.find("#page-operations").is_displayed(),
            "(administrator)" in console.find("#who").text,
        )

    assert (False, False, False) == await console.run(check)
    token = await _token(console, USER)
    for path in ("/list/sdapi/functions", "/deadletters"):
        async with console.system.http.get(
            f"{console.url}{path}", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            assert 403 == response.status, path


async def test_txt2img_shows_progress_to_100_and_the_image(console: Console) -> None:
    def flow() -> tuple[str, str, int, str, str, int]:
        console.sign_in(USER)
        console.find("#gen-form [name=prompt]").send_keys("a lighthouse at dusk")
        task_id = _generate(console, steps=4)
        _succeeded(console)
        progress = console.find("#progress").get_attribute("value") or ""
        width = console.driver.execute_script(
            "return document.querySelector('#images img').naturalWidth"
        )
        infotext = console.visible("#infotext").text
        console.driver.execute_script("window.scrollTo(0, 0)")
        console.screenshot("playground")
        console.find("#rerun").click()  # the same request again: a new task
        console.wait(lambda d: d.find_element("css selector", "#task-id").text != task_id)
        _succeeded(console)
        # Hires fix: a second pass at twice the size.
        console.find("#gen-form details summary").click()
        console.find("#gen-form [name=enable_hr]").click()
        hires = _generate(console, steps=2)
        _succeeded(console)
        hires_width = console.driver.execute_script(
            "return document.querySelector('#images img').naturalWidth"
        )
        # The gallery lists it; opening it shows its image and parameters.
        console.go("gallery")
        console.visible(f'#gallery-table button.link[data-task="{task_id}"]').click()
        console.visible("#gallery-detail img")
        console.screenshot("gallery")
        detail = console.find("#gallery-detail").text
        return task_id, progress, width, infotext + detail, hires, hires_width

    task_id, progress, width, texts, hires, hires_width = await console.run(flow)
    assert "100" == progress
    assert 64 == width
    assert "a lighthouse at dusk" in texts
    assert task_id in texts
    document = await console.system.task(task_id)
    assert document is not None
    assert ("succeeded", USER) == (document["status"], document["user"])
    assert 128 == hires_width
    hires_command = await console.system.command(hires)
    assert isinstance(hires_command, Txt2ImgTask)
    assert hires_command.request.enable_hr


async def test_cancel_stops_a_running_task(console: Console) -> None:
    def flow() -> str:
        console.sign_in(USER)
        task_id = _generate(console, steps=150, size=256)
        progress = "return document.querySelector('#progress').value"
        console.wait(lambda d: d.execute_script(progress) >= 1)
        # A live preview of the latents is shown while it denoises.
        preview = "return document.querySelector('#preview').naturalWidth"
        console.wait(lambda d: d.execute_script(preview) > 0)
        console.screenshot("playground-running")
        console.find("#cancel").click()
        console.text_of("#task-status", "cancelled")
        console.go("gallery")
        Select(console.find("#gallery-filter [name=status]")).select_by_visible_text("cancelled")

        def listed(driver: WebDriver) -> bool:
            # Filtered again until the store has folded the cancellation in (a moment):
            # then the task is listed, and only cancelled tasks are.
            driver.find_element("css selector", "#gallery-filter button[type=submit]").click()
            table = driver.find_element("css selector", "#gallery-table")
            statuses = {e.text for e in table.find_elements("css selector", ".status")}
            return task_id in table.text and {"cancelled"} == statuses

        console.wait(listed)
        return task_id

    task_id = await console.run(flow)
    document = await console.system.task_when(task_id, lambda d: d["status"] != "running")
    assert "cancelled" == document["status"]
    assert document["progress"]["step"] < 150


async def test_painted_mask_inpaints_only_the_painted_half(
    console: Console, tmp_path: Path
) -> None:
    source = tmp_path / "input.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(source)

    def flow() -> tuple[str, str]:
        console.sign_in(USER)
        console.find("#gen-form [name=mode][value=img2img]").click()
        console.visible("#init-file").send_keys(str(source))
        canvas = console.visible("#mask-canvas")
        console.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
        width = canvas.size["width"]
        # A stroke down the left quarter of the image (offsets from the canvas centre).
        x = -width * 3 // 8
        ActionChains(console.driver).move_to_element_with_offset(
            canvas, x, -width // 3
        ).click_and_hold().move_by_offset(0, width * 2 // 3).release().perform()
        console.find("#gen-form [name=prompt]").send_keys("a stone wall")
        task_id = _generate(console, steps=3)
        _succeeded(console)
        console.screenshot("inpaint")
        # The result goes back in as the next input (by its object key), unmasked.
        result = console.find("#images img").get_attribute("src")
        console.find("#send-img2img").click()
        shown = "return document.querySelector('#init-canvas').dataset.source"
        console.wait(lambda d: d.execute_script(shown) == result)
        console.find("#mask-clear").click()
        again = _generate(console, steps=3)
        _succeeded(console)
        return task_id, again

    task_id, again = await console.run(flow)
    sent = await console.system.task(again)
    assert sent is not None
    assert ("img2img", "succeeded") == (sent["kind"], sent["status"])
    sent_command = await console.system.command(again)
    assert isinstance(sent_command, Img2ImgTask)
    assert sent_command.request.mask is None
    painted = await console.system.command(task_id)
    assert isinstance(painted, Img2ImgTask)
    assert painted.request.mask is not None
    mask = Image.open(io.BytesIO(await console.system.objects.get(painted.request.mask)))
    gray = mask.convert("L")
    assert (64, 64) == gray.size
    assert 255 == gray.getpixel((8, 32))  # painted
    assert 0 == gray.getpixel((56, 32))  # untouched


async def test_uploaded_model_becomes_usable(console: Console, tiny_checkpoint: Path) -> None:
    def flow() -> str:
        console.sign_in(ADMIN)
        console.go("models")
        form = "#upload-form"
        Select(console.find(f"{form} [name=type]")).select_by_value("stableDiffusion")
        console.find(f"{form} [name=name]").send_keys(UPLOADED)
        console.find(f"{form} [name=file]").send_keys(str(tiny_checkpoint))
        console.find(f"{form} button[type=submit]").click()
        console.text_of("#upload-status", f"{UPLOADED} uploaded")
        row = f'table[data-type=stableDiffusion] tr[data-model="{UPLOADED}"] .status'
        console.wait(lambda d: d.find_element("css selector", row).text == "unloaded")
        console.screenshot("models")
        console.go("playground")
        console.wait(lambda d: d.find_elements("css selector", f'option[value="{UPLOADED}"]'))
        task_id = _generate(console, model=UPLOADED, steps=2)
        _succeeded(console)
        return task_id

    task_id = await console.run(flow)
    document = await console.system.task(task_id)
    assert document is not None
    assert (UPLOADED, "succeeded") == (document["model_name"], document["status"])


async def test_administrator_changes_max_instances(console: Console) -> None:
    def flow() -> None:
        console.sign_in(ADMIN)
        console.go("operations")
        field = console.visible(f'#functions-table tr[data-model="{MODEL}"] [name=maxInstances]')
        row = field.find_element("xpath", "./ancestor::tr")
        field.clear()
        field.send_keys("3")
        row.find_element("css selector", "button").click()
        saved = "#ops-status"
        console.wait(lambda d: d.find_element("css selector", saved).text.startswith("saved"))
        console.visible("#workers-table tbody tr")
        console.text_of("#dead-table tbody", "No dead letters.")  # GET /deadletters answered
        console.screenshot("operations")

    await console.run(flow)
    token = await _token(console, ADMIN)
    async with console.system.http.get(
        f"{console.url}/list/sdapi/functions", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        functions = {f["model"]: f for f in (await response.json())["functions"]}
    assert 3 == functions[MODEL]["maxInstances"]


async def test_administrator_registers_from_the_store_and_deletes_with_drain(
    console: Console, tiny_checkpoint: Path
) -> None:
    stored = "uploads/stored.safetensors"
    data = await asyncio.to_thread(tiny_checkpoint.read_bytes)
    await console.system.objects.put(stored, data, "application/octet-stream")

    def flow() -> None:
        console.sign_in(ADMIN)
        console.go("models")
        form = "#register-form"
        Select(console.find(f"{form} [name=type]")).select_by_value("stableDiffusion")
        console.find(f"{form} [name=ossPath]").send_keys(stored)
        console.find(f"{form} button[type=submit]").click()
        console.text_of("#register-status", "register success")
        status = 'table[data-type=stableDiffusion] tr[data-model="stored.safetensors"] .status'
        console.wait(lambda d: d.find_element("css selector", status).text == "unloaded")
        console.visible(f'tr[data-model="{UPLOADED}"] button').click()
        console.driver.switch_to.alert.accept()  # "Delete …? Queued tasks run first"
        row = f'table[data-type=stableDiffusion] tr[data-model="{UPLOADED}"]'
        console.wait(lambda d: not d.find_elements("css selector", row))

    await console.run(flow)
    document = await console.system.db["models"].find_one({"name": UPLOADED})
    assert document is not None
    assert "deleted" == document["status"]
