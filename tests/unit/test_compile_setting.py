"""``SDSWARM_COMPILE`` per function: a function's ``env`` reaches its workers' settings and
wins over the operator's default (no I/O: the environment a worker would start with)."""

from __future__ import annotations

import pytest

from services.common.settings import from_environ
from services.inference.settings import WorkerSettings
from services.scheduler.local import worker_environ
from services.scheduler.settings import SchedulerSettings
from tests.integration.scheduling import checkpoint


@pytest.mark.parametrize(
    ("default", "function_env", "expected"),
    [
        (None, {}, False),
        ("true", {}, True),
        (None, {"SDSWARM_COMPILE": "true"}, True),
        ("true", {"SDSWARM_COMPILE": "false"}, False),
    ],
)
def test_a_functions_env_sets_compile_for_its_workers(
    monkeypatch: pytest.MonkeyPatch,
    default: str | None,
    function_env: dict[str, str],
    expected: bool,
) -> None:
    if default is None:
        monkeypatch.delenv("SDSWARM_COMPILE", raising=False)
    else:
        monkeypatch.setenv("SDSWARM_COMPILE", default)
    model = checkpoint("m.safetensors")
    model["function"] = {"env": function_env}
    environ = worker_environ(SchedulerSettings(), model)
    assert expected is from_environ(WorkerSettings, environ).compile


def test_a_functions_env_sets_the_sizes_to_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDSWARM_COMPILE_SIZES", raising=False)
    model = checkpoint("m.safetensors")
    model["function"] = {"env": {"SDSWARM_COMPILE_SIZES": "512x512,768x512"}}
    environ = worker_environ(SchedulerSettings(), model)
    assert "512x512,768x512" == from_environ(WorkerSettings, environ).compile_sizes
