"""A service's metrics listener (``SDSWARM_METRICS_PORT``): off at 0, a free port at -1,
``/metrics`` in Prometheus' text format and ``/targets`` for HTTP service discovery."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proto.workers import WorkerState, WorkerStatus
from services.common import metrics
from services.common.servers import PortInUseError, free_port
from services.common.settings import BusSettings
from services.scheduler.policy import CheckpointLoad, Plan

pytestmark = pytest.mark.integration


async def test_port_zero_is_off() -> None:
    async with metrics.listening(BusSettings(metrics_port=0)) as address:
        assert address is None
        assert "" == metrics.listening_at()


async def test_a_free_port_serves_metrics_and_targets_while_open() -> None:
    worker = WorkerStatus(
        worker="w9",
        model_key="tiny-1",
        model_name="tiny",
        state=WorkerState.READY,
        metrics_address="127.0.0.1:1",
    )
    metrics.scheduled(1, [CheckpointLoad("tiny-1", 0, 0, 1, 1)], Plan({}, {}), [worker], {})
    async with (
        metrics.listening(BusSettings(metrics_port=-1)) as address,
        aiohttp.ClientSession() as http,
    ):
        assert address is not None
        assert address == metrics.listening_at()
        host, port = address.split(":")
        assert "127.0.0.1" == host
        async with http.get(f"http://{address}/metrics") as response:
            assert 200 == response.status
            assert response.headers["Content-Type"].startswith("text/plain")
            families = {f.name for f in text_string_to_metric_families(await response.text())}
        assert "sdswarm_budget_slots" in families
        async with http.get(f"http://{address}/targets") as response:
            targets = await response.json()
        assert [{"targets": ["127.0.0.1:1"], "labels": {"model": "tiny-1", "worker": "w9"}}] == (
            targets
        )
    assert "" == metrics.listening_at()
    metrics.stood_down()
    # closed: the port is free again
    async with metrics.listening(BusSettings(metrics_port=int(port))) as again:
        assert f"127.0.0.1:{port}" == again


async def test_a_taken_port_is_an_error_naming_it() -> None:
    port = free_port()
    async with metrics.listening(BusSettings(metrics_port=port)):
        with pytest.raises(PortInUseError, match=f"{port}.*SDSWARM_METRICS_PORT"):
            async with metrics.listening(BusSettings(metrics_port=port)):
                pass
