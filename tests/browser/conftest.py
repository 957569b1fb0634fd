"""The web console in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``; ``make test`` installs them), against one whole system per module.

Selenium is blocking and the system runs on this event loop, so every browser step runs
in a thread (``Console.run``). Screenshots land in ``test-artifacts/browser/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver import Chrome as WebDriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from services.storage.users import UserStore
from tests.system import System, SystemFactory

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("SDSWARM_TEST_ARTIFACTS", "test-artifacts")) / "browser"
ADMIN, USER = "admin", "bob"
MODEL = "tiny.safetensors"
PASSWORD = "correct horse battery"
WAIT_S = 120.0
"""The longest a step waits for the page (a cold worker start on a busy machine)."""
T = TypeVar("T")

# Without the background-networking flags Chromium keeps calling home, which fails (and
# slows down) on a closed network.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
]


@dataclass
class Console:
    """The console's URL on a running system, and a browser signed in as nobody yet."""

    url: str
    system: System
    driver: WebDriver

    async def run(self, step: Callable[[], T]) -> T:
        """A blocking browser step, off the event loop the system runs on."""
        return await asyncio.to_thread(step)

    def wait(self, check: Callable[[WebDriver], Any], timeout_s: float = WAIT_S) -> Any:
        try:
            # Pages redraw their tables while a check reads them: a stale element is a retry.
            wait = WebDriverWait(
                self.driver, timeout_s, 0.1, ignored_exceptions=[StaleElementReferenceException]
            )
            return wait.until(check)
        except TimeoutException as exc:
            shot = self.screenshot("timed-out")
            page = self.driver.execute_script(
                "return ['notice', 'task-status', 'task-id', 'who']"
                ".map(id => `${id}: ${document.getElementById(id)?.textContent}`).join('; ')"
            )
            entries = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
            logs = [entry["message"] for entry in entries]
            raise AssertionError(f"page: {page}; console: {logs}; screenshot: {shot}") from exc

    def find(self, css: str) -> WebElement:
        return self.driver.find_element("css selector", css)

    def visible(self, css: str) -> WebElement:
        """The element once it is displayed."""
        element: WebElement = self.wait(
            lambda d: (e := d.find_element("css selector", css)).is_displayed() and e
        )
        return element

    def text_of(self, css: str, text: str) -> None:
        self.wait(lambda d: d.find_element("css selector", css).text == text)

    def sign_in(self, user: str) -> None:
        """Sign in through the form, from a fresh page with no session."""
        # Away from the console (a hash change alone would not reload it), forget the
        # session, then load it afresh.
        self.driver.get(self.url + "/console/console.css")
        self.driver.execute_script("sessionStorage.clear()")
        self.driver.get(self.url + "/#playground")
        self.visible("#login-form [name=userName]").send_keys(user)
        self.find("#login-form [name=password]").send_keys(PASSWORD + "\n")  # Enter submits
        self.wait(lambda d: d.find_element("css selector", "#who").text.startswith(user))
        self.visible("#page-playground")

    def go(self, page: str) -> None:
        self.driver.get(f"{self.url}/#{page}")
        self.visible(f"#page-{page}")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def _browser_installed() -> bool:
    return CHROMIUM.exists() and CHROMEDRIVER.exists()


@pytest.fixture(scope="module")
async def console(
    tmp_path_factory: pytest.TempPathFactory, make_system: SystemFactory
) -> AsyncIterator[Console]:
    """One system (authentication on, ``admin`` an administrator, two GPU slots so an
    uploaded checkpoint gets a worker beside the tiny one) and one browser per module."""
    if not _browser_installed():
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver (make test installs them)")
    data = tmp_path_factory.mktemp("console")
    # A models folder of its own: the tests upload a checkpoint into it.
    models = make_system.models([MODEL])
    async with make_system(models=models, auth=True, admins=[ADMIN], gpu_slots=2) as system:
        users = UserStore(system.db)
        for name in (ADMIN, USER):
            await users.add(name, PASSWORD)
        with contextlib.ExitStack() as stack:
            driver = await asyncio.to_thread(
                lambda: stack.enter_context(chromium(data / "chromium-profile"))
            )
            try:
                yield Console(url=system.url, system=system, driver=driver)
            finally:
                await asyncio.to_thread(stack.close)
