"""How many threads a CPU worker gives torch (``SDSWARM_CPU_THREADS``)."""

from services.inference.__main__ import torch_threads


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
