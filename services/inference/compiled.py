"""``SDSWARM_COMPILE``: the UNet behind ``torch.compile`` (inductor), never at a task's cost.

``torch.compile`` compiles lazily, at the first call of each new shape, so a failure can
come at any call, not only when wrapping. The UNet's ``forward`` is therefore routed
through a guard: a call that fails compiled is run again eagerly; when the eager call
succeeds, compilation was at fault and the worker serves eagerly from then on (logged
with the reason); when it fails too, its error is the task's and compilation stays on.
The UNet's forward is a pure function of its inputs, so running it again is safe.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def compile_unet(unet: Any, device: str) -> bool:
    """Route ``unet``'s calls through ``torch.compile``; whether it is compiled now."""
    import torch

    eager = unet.forward
    try:
        if device.startswith("cuda"):
            unet.to(memory_format=torch.channels_last)  # inductor's fast convolution layout
        compiled = torch.compile(eager, backend="inductor")
    except Exception as exc:
        log.warning("torch.compile of the UNet failed (%s: %s); serving eagerly", _name(exc), exc)
        return False
    active = [True]

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not active[0]:
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)  # type: ignore[no-untyped-call]
        except Exception as exc:
            failure = exc
        result = eager(*args, **kwargs)  # fails too: not compilation's fault, the task's
        active[0] = False
        log.warning(
            "compiled UNet failed (%s: %s); serving eagerly from now on", _name(failure), failure
        )
        return result

    unet.forward = forward
    unet.sdswarm_compiled = active
    """``[True]`` while compiled calls are in use (tests and status read it)."""
    return True


def _name(exc: BaseException) -> str:
    return type(exc).__name__
