"""ControlNet units as diffusers' multi-ControlNet, with A1111's control modes.

Its own module so that the worker imports diffusers' ControlNet modules only for a task
that uses ControlNet (:meth:`services.inference.controlnet.Control.model`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from proto.controlnet import CONTROL_MODES
from services.inference.preprocessors import ControlNetError

SOFT_INJECTION_BASE = 0.825
"""The extension's per-layer decay of the residuals in the two unbalanced control modes."""


class ControlUnits(MultiControlNetModel):
    """The task's ControlNets as diffusers' multi-ControlNet, with each unit's control
    mode applied to its residuals; a unit whose scale is 0 this step is not run."""

    def __init__(self, nets: list[Any], modes: list[str], *, guided: bool) -> None:
        if not nets:
            raise ControlNetError("no ControlNet unit to run")
        super().__init__(nets)
        self.modes = modes
        self.guided = guided
        """Classifier-free guidance is on: the batch is [unconditional, conditional]."""

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: list[torch.Tensor],
        conditioning_scale: list[float],
        **kwargs: Any,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        kwargs["return_dict"] = False
        down_total: list[torch.Tensor] | None = None
        mid_total: torch.Tensor | None = None
        units = list(zip(controlnet_cond, conditioning_scale, self.nets, self.modes, strict=True))
        active = [unit for unit in units if unit[1] != 0] or units[:1]
        for image, scale, net, mode in active:
            down, mid = net(
                sample=sample,
                timestep=timestep,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=image,
                conditioning_scale=scale,
                **kwargs,
            )
            down, mid = self._shape(list(down), mid, mode)
            if down_total is None or mid_total is None:
                down_total, mid_total = down, mid
            else:
                down_total = [a + b for a, b in zip(down_total, down, strict=True)]
                mid_total = mid_total + mid
        assert down_total is not None
        assert mid_total is not None
        return down_total, mid_total

    def _shape(
        self, down: list[torch.Tensor], mid: torch.Tensor, mode: str
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        if mode == CONTROL_MODES[0]:
            return down, mid
        layers = len(down) + 1  # the middle block is the deepest, at full weight
        down = [d * SOFT_INJECTION_BASE ** (layers - 1 - i) for i, d in enumerate(down)]
        if mode == CONTROL_MODES[2] and self.guided:
            half = mid.shape[0] // 2
            keep = torch.ones(mid.shape[0], 1, 1, 1, dtype=mid.dtype, device=mid.device)
            keep[:half] = 0
            down = [d * keep for d in down]
            mid = mid * keep
        return down, mid
