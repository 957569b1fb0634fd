"""SSE survives reconnects: Last-Event-ID resumes with no gap and no duplicate."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.conftest import System

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("system", ["local"], indirect=True)]

Event = tuple[int, str, dict[str, Any]]


async def _read(
    system: System, task_id: str, last_id: int | None, stop_after: int | None
) -> list[Event]:
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    events: list[Event] = []
    async with system.http.get(f"{system.url}/tasks/{task_id}/events", headers=headers) as r:
        assert 200 == r.status
        name, event_id = "", 0
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: "):
                events.append((event_id, name, json.loads(line[6:])))
                if stop_after is not None and len(events) >= stop_after:
                    break  # drop the connection mid-task
    return events


async def test_reconnect_with_last_event_id_misses_nothing(system: System) -> None:
    body = {
        "stable_diffusion_model": "tiny.safetensors",
        "prompt": "x",
        "steps": 40,
        "width": 128,
        "height": 128,
    }
    task_id = await system.submit(body)

    first = await _read(system, task_id, None, stop_after=3)
    assert 3 == len(first)
    rest = await _read(system, task_id, first[-1][0], stop_after=None)
    everything = await _read(system, task_id, None, stop_after=None)

    received = first + rest
    assert [e[0] for e in everything] == [e[0] for e in received], "no gap, no duplicate"
    assert "succeeded" == received[-1][1]
    assert list(range(1, 41)) == [e[2]["step"] for e in received if e[1] == "progress"]
