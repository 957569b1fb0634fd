"""How many threads a CPU worker gives torch (``SDSWARM_CPU_THREADS``)."""

import pytest

from services.inference.__main__ import torch_threads
from services.scheduler.local import cpu_share, worker_environ
from services.scheduler.settings import SchedulerSettings


def test_a_core_is_left_to_the_rest_unless_the_operator_chose() -> None:
    # Torch's threads wait for each other at every operation: one descheduled by the
    # worker's event loop or the control plane stalls them all, so one core stays free.
    assert 1 == torch_threads(0, 2, {})
    assert 15 == torch_threads(0, 16, {})
    assert 1 == torch_threads(0, 1, {})
    # The setting wins; OMP_NUM_THREADS set by the operator is left to torch.
    assert 2 == torch_threads(2, 2, {"OMP_NUM_THREADS": "1"})
    assert torch_threads(0, 8, {"OMP_NUM_THREADS": "4"}) is None
    assert 7 == torch_threads(0, 8, {"OMP_NUM_THREADS": ""})


def test_local_workers_share_the_cores_the_budget_lets_run_at_once() -> None:
    # Four workers at once on 16 cores: 3 threads each (15 in all), not 15 each.
    assert {"SDSWARM_CPU_THREADS": "3"} == cpu_share({}, 4, 16)
    assert {"SDSWARM_CPU_THREADS": "15"} == cpu_share({}, 1, 16)
    assert {"SDSWARM_CPU_THREADS": "1"} == cpu_share({"SDSWARM_CPU_THREADS": "0"}, 2, 2)
    # The operator's choice (also a function's own env) stands.
    assert {} == cpu_share({"SDSWARM_CPU_THREADS": "6"}, 4, 16)
    assert {} == cpu_share({"OMP_NUM_THREADS": "2"}, 4, 16)


def test_a_local_worker_is_given_its_share(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OMP_NUM_THREADS", "SDSWARM_CPU_THREADS"):
        monkeypatch.delenv(name, raising=False)
    model = {"name": "m", "model_key": "k", "path": "/m.safetensors"}
    environ = worker_environ(SchedulerSettings(gpu_slots=64), model)
    assert "1" == environ["SDSWARM_CPU_THREADS"]  # 64 workers on this machine: 1 each
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert "SDSWARM_CPU_THREADS" not in worker_environ(SchedulerSettings(gpu_slots=64), model)
