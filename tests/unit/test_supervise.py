import asyncio
import logging

import pytest

from services.common.supervise import restart_delay, supervised


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
    expected = ["flaky crashed; restarting in 0.01 s", "flaky crashed; restarting in 0.02 s"]
    assert expected == [r.getMessage() for r in caplog.records]


def test_restart_delay_doubles_up_to_its_cap() -> None:
    assert [1, 2, 4, 8, 16, 30, 30] == [restart_delay(n, 1.0, 30.0) for n in range(1, 8)]
    assert 30.0 == restart_delay(10_000, 1.0, 30.0)
