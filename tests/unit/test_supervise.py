import asyncio
import logging

import pytest

from services.common.supervise import supervised


async def test_a_crashed_loop_is_logged_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    stop = asyncio.Event()
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError(f"boom {runs}")
        stop.set()

    with caplog.at_level(logging.ERROR):
        await asyncio.wait_for(supervised("flaky", flaky, stop, backoff_s=0.01), 5)
    assert 3 == runs
    assert ["flaky crashed; restarting in 0 s"] * 2 == [r.getMessage() for r in caplog.records]
