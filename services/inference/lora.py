"""LoRAs applied for one task at a time, on the loaded checkpoint.

Each LoRA file is loaded once into the pipeline as a named PEFT adapter (diffusers
converts A1111/kohya keys), kept for later tasks up to ``max_loaded`` adapters (least
recently used ones are deleted), and switched on only while a task that names it runs:
outside such a task every adapter is disabled, so the next task sees the base weights.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from proto.commands import AdapterRef
from services.inference.compiled import lora_loading

log = logging.getLogger(__name__)


class LoraError(Exception):
    """A LoRA cannot be applied to this checkpoint; the message says which and why."""


def adapter_name(ref: AdapterRef) -> str:
    """A stable adapter name per file content (a replaced file is a new adapter)."""
    digest = ref.sha256 or hashlib.sha256(ref.path.encode()).hexdigest()
    return f"lora_{digest[:16]}"


class LoraSet:
    def __init__(self, pipe: Any, max_loaded: int = 8) -> None:
        self.pipe = pipe
        self.max_loaded = max_loaded
        self.loaded: collections.OrderedDict[str, str] = collections.OrderedDict()
        """Adapter name → LoRA name, least recently used first."""

    def _load(self, ref: AdapterRef) -> str:
        name = adapter_name(ref)
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return name
        path = Path(ref.path)
        if path.suffix.lower() != ".safetensors":
            raise LoraError(f"LoRA {ref.name!r}: only .safetensors files load")
        from safetensors.torch import load_file

        lora_loading(self.pipe.unet)  # a compiled UNet's graphs lack the LoRA's layers
        try:
            state = load_file(str(path))
            with warnings.catch_warnings():
                # PEFT warns whenever a model gets a second adapter: several are the point.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self.pipe.load_lora_weights(state, adapter_name=name)
        except Exception as exc:  # a LoRA for another architecture, a damaged file …
            with contextlib.suppress(Exception):
                self.pipe.delete_adapters([name])
            raise LoraError(
                f"LoRA {ref.name!r} cannot be applied to this checkpoint: {exc}"
            ) from exc
        self.loaded[name] = ref.name
        while len(self.loaded) > self.max_loaded:
            old, old_lora = self.loaded.popitem(last=False)
            self.pipe.delete_adapters([old])
            log.info("unloaded LoRA %s (cache holds %d)", old_lora, self.max_loaded)
        return name

    def activate(self, refs: list[AdapterRef]) -> None:
        """Exactly the named LoRAs at their weights from now on (none: the base weights)."""
        if not refs:
            if self.loaded:
                self.pipe.disable_lora()
            return
        weights: dict[str, float] = {}
        for ref in refs:  # the same LoRA twice: its weights add up, as in A1111
            name = self._load(ref)
            weights[name] = weights.get(name, 0.0) + ref.weight
        self.pipe.enable_lora()
        self.pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))

    @contextlib.contextmanager
    def applied(self, refs: list[AdapterRef]) -> Iterator[None]:
        """The named LoRAs at their weights for the duration (:meth:`activate` may switch
        them inside); none of them after."""
        self.activate(refs)
        try:
            yield
        finally:
            if self.loaded:
                self.pipe.disable_lora()
