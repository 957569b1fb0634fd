"""``SDSWARM_COMPILE``: the UNet compiled for a few static shapes, never at a task's cost.

A compiled graph is specialised to its input shapes, and compiling one takes about a
minute for SD1.5 on an H200. So the worker plans its shapes up front (:mod:`compileplan`:
static batch buckets × image sizes), serves eagerly, and compiles them one by one in a
background thread with dummy inputs; a shape's calls switch to the compiled graph once its
dummy call has returned. A call is routed to the graph only when its inputs, padded up to
the bucket, have exactly the dummy's shapes, dtypes and devices (so no call can trigger a
compile); every other call runs eagerly: shapes not ready, ControlNet residuals, any
unexpected argument, a UNet carrying LoRA layers, and ``eager()`` sections (A1111
``tiling`` changes the convolutions in place, which a graph would ignore).

Rows are independent in the UNet (GroupNorm and attention work per sample), so padding a
batch with copies of its last row changes the real rows by rounding at most.

Failures never fail a task: a shape that fails to compile marks compile failed (logged with
the reason) and everything stays eager; a compiled call that raises is run again eagerly
and, when that succeeds, compilation was at fault and the worker serves eagerly from then
on. When the eager call fails too, its error is the task's and compilation stays on. The
UNet's forward is a pure function of its inputs, so running it again is safe.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from proto.workers import CompileState, CompileStatus
from services.inference.compileplan import TEXT_TOKENS, Shape, persist_caches, plan

log = logging.getLogger(__name__)

RECOMPILE_MARGIN = 4
"""Graphs dynamo may compile beyond the planned shapes before it gives up on the UNet (and
runs it eagerly): a guard that fails unexpectedly cannot compile forever."""
SDXL_TIME_IDS = 6
"""SDXL's micro-conditioning: original size, crop offset and target size, two numbers each."""

LORA_APPLIED = "a LoRA was applied: its layers stay in the UNet, which serves eagerly"

Compiler = Callable[[Callable[..., Any]], Callable[..., Any]]
Inputs = dict[str, torch.Tensor | None]


def inductor(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Static shapes: one graph per planned shape, none of them generic."""
    return torch.compile(fn, backend="inductor", dynamic=False)


def fixed_call(forward: Callable[..., Any]) -> Callable[..., torch.Tensor]:
    """``forward`` behind one keyword signature, the same for dummy and real calls."""

    def unet_call(
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None,
        time_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        output = forward(
            sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False
        )
        return output[0]  # type: ignore[no-any-return]

    return unet_call


def compile_unet(
    pipe: Any,
    *,
    device: str,
    base: str,
    max_batch: int,
    sizes: str,
    cache_dir: Path,
    compiler: Compiler = inductor,
) -> CompiledUnet:
    """``pipe``'s UNet compiled for its planned shapes (see :mod:`compileplan`); call
    :meth:`CompiledUnet.start` once the worker has loaded."""
    try:
        shapes = plan(max_batch, sizes, base, pipe.scheduler.config.get("prediction_type") or "")
        import torch._inductor.config

        persist_caches(cache_dir, torch.__version__)
        torch._inductor.config.fx_graph_cache = True  # the persisted part
    except Exception as exc:  # a wrong SDSWARM_COMPILE_SIZES, an inductor that cannot load
        off = _reason("compile is off", exc)
        return CompiledUnet(pipe.unet, device=device, shapes=[], error=off)
    return CompiledUnet(
        pipe.unet, device=device, shapes=shapes, scale=pipe.vae_scale_factor, compiler=compiler
    )


class CompiledUnet:
    """Installed as ``unet.forward`` (and ``unet.sdswarm_compiled``); see the module doc."""

    def __init__(
        self,
        unet: Any,
        *,
        device: str,
        shapes: list[Shape],
        scale: int = 8,
        compiler: Compiler = inductor,
        error: str = "",
    ) -> None:
        """``error``: compile is off for this reason (nothing is installed)."""
        self.unet = unet
        self.device = device
        self.scale = scale
        """Pixels per latent cell (the VAE's downsampling)."""
        self.eager_forward = unet.forward
        """The UNet's own forward."""
        self.batches = sorted({shape.batch for shape in shapes})
        self.compiled_calls = 0
        """Calls served by a compiled graph (tests and metrics read it)."""
        self._parameters = inspect.signature(self.eager_forward)
        self._cond = threading.Condition()
        self._state = CompileState.COMPILING
        self._error = ""
        self._pending = list(shapes)
        self._ready: dict[Shape, tuple[Any, ...]] = {}
        self._seconds = 0.0
        self._holds = 0
        """``eager()`` sections open now: calls run eagerly, no shape starts compiling."""
        self._tracing = False
        self._lora = False
        """A LoRA was loaded into the UNet: eager for good."""
        self.thread: threading.Thread | None = None
        """The background compile, once started."""
        self._compiled: Callable[..., torch.Tensor] = fixed_call(self.eager_forward)
        if error:
            self.fail(error)
            return
        try:
            import torch._dynamo.config

            if device.startswith("cuda"):
                unet.to(memory_format=torch.channels_last)  # inductor's fast convolution layout
            limit = len(shapes) + RECOMPILE_MARGIN
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, limit)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, limit)
            self._compiled = compiler(self._compiled)
        except Exception as exc:
            self.fail("torch.compile of the UNet failed", exc)
            return
        unet.forward = self
        unet.sdswarm_compiled = self

    @property
    def state(self) -> CompileState:
        return self._state

    def status(self) -> CompileStatus:
        with self._cond:
            return CompileStatus(
                state=self._state,
                ready=[shape.label for shape in self._ready],
                pending=len(self._pending) if self._state is CompileState.COMPILING else 0,
                seconds=round(self._seconds, 1),
                error=self._error,
                calls=self.compiled_calls,
            )

    def fail(self, what: str, exc: BaseException | None = None) -> None:
        """Eager from now on, with the reason (the first one is kept)."""
        reason = _reason(what, exc)
        with self._cond:
            if self._state is CompileState.FAILED:
                return
            self._state, self._error = CompileState.FAILED, reason
            self._cond.notify_all()
        log.warning("%s; serving eagerly", reason)

    def _lora_applied(self) -> bool:
        if not self._lora and getattr(self.unet, "peft_config", None) is not None:
            self.lora_loading()  # loaded by someone other than LoraSet
        return self._lora

    def lora_loading(self) -> None:
        """Eager for good: PEFT wraps the UNet's modules when a LoRA loads, and deleting the
        LoRA leaves the wrappers, which the graphs do not have (LoraSet calls this first)."""
        with self._cond:
            if self._lora:
                return
            self._lora = True
            if self._state in (CompileState.COMPILING, CompileState.READY):
                self._state = CompileState.OFF
                self._error = LORA_APPLIED
            self._cond.notify_all()
        log.info("%s", LORA_APPLIED)

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Eager calls for the duration, for changes a graph would not see (A1111 ``tiling``
        sets the convolutions' padding mode). Waits for a shape being compiled, whose trace
        would otherwise capture the change."""
        with self._cond:
            while self._tracing:
                self._cond.wait()
            self._holds += 1
        try:
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    def start(self) -> threading.Thread | None:
        """Compile the planned shapes in a daemon thread (none when nothing is to do)."""
        if self._state is not CompileState.COMPILING:
            return None
        self.thread = threading.Thread(
            target=self._compile_planned, name="compile-unet", daemon=True
        )
        self.thread.start()
        return self.thread

    def wait(self, timeout: float | None = None) -> CompileState:
        """The state once the background compile has ended (or ``timeout`` has passed)."""
        if self.thread is not None:
            self.thread.join(timeout)
        return self._state

    def _compile_planned(self) -> None:
        if self.device == "cpu":
            torch.set_flush_denormal(True)  # per thread; tiny weights hit denormals
        for shape in list(self._pending):
            with self._cond:
                while self._holds:
                    self._cond.wait()
                if self._state is not CompileState.COMPILING or self._lora_applied():
                    return
                self._tracing = True
            began = time.monotonic()
            try:
                with torch.inference_mode():  # as the pipeline calls: the same guards
                    inputs = self.dummy_inputs(shape)
                    self._compiled(**inputs)
            except Exception as exc:
                if not self._lora_applied():  # a LoRA loaded mid-trace is no compile error
                    self.fail(f"compiling the UNet for {shape.label} failed", exc)
                return
            finally:
                with self._cond:
                    self._tracing = False
                    self._seconds += time.monotonic() - began
                    self._cond.notify_all()
            with self._cond:
                self._pending.remove(shape)
                self._ready[shape] = _signature(inputs)
                if not self._pending and self._state is CompileState.COMPILING:
                    self._state = CompileState.READY
            log.info(
                "UNet compiled for %s in %.1f s (%d to go)",
                shape.label,
                time.monotonic() - began,
                len(self._pending),
            )

    def dummy_inputs(self, shape: Shape) -> Inputs:
        """Inputs of ``shape`` as the pipelines build them, from the UNet's config (in
        channels: 9 for inpainting; text width; SDXL's pooled text and time ids)."""
        config = self.unet.config
        weight = next(self.unet.parameters())
        batch, height, width = shape.batch, shape.height // self.scale, shape.width // self.scale
        generator = torch.Generator("cpu").manual_seed(0)

        def noise(*size: int) -> torch.Tensor:
            return torch.randn(size, generator=generator).to(weight.device, weight.dtype)

        inputs: Inputs = {
            "sample": noise(batch, config.in_channels, height, width),
            "timestep": torch.full((batch,), 999.0, device=weight.device),
            "encoder_hidden_states": noise(batch, TEXT_TOKENS, config.cross_attention_dim),
            "text_embeds": None,
            "time_ids": None,
        }
        if getattr(config, "addition_embed_type", None) == "text_time":
            pooled = config.projection_class_embeddings_input_dim - (
                SDXL_TIME_IDS * config.addition_time_embed_dim
            )
            inputs["text_embeds"] = noise(batch, pooled)
            inputs["time_ids"] = noise(batch, SDXL_TIME_IDS)
        return inputs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._ready:  # the usual case while compiling: nothing to look at
            return self.eager_forward(*args, **kwargs)
        with torch.inference_mode():  # fresh inference tensors, as the dummies were
            routed = self._route(args, kwargs)
        if routed is None:
            return self.eager_forward(*args, **kwargs)
        inputs, rows, return_dict = routed
        try:
            with torch.inference_mode():
                output = self._compiled(**inputs)
        except Exception as exc:
            failure = exc
        else:
            self.compiled_calls += 1
            return _output(output[:rows], return_dict)
        # When this fails too, it is not compilation's fault: the error is the task's.
        result = self.eager_forward(*args, **kwargs)
        self.fail("a compiled UNet call failed", failure)
        return result

    def _route(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Inputs, int, bool] | None:
        """The padded inputs of a call a ready graph serves as it is, its real batch and
        its ``return_dict``; None for an eager call."""
        if self._holds or self._state not in (CompileState.COMPILING, CompileState.READY):
            return None
        if self._lora_applied():
            return None
        try:
            given = dict(self._parameters.bind(*args, **kwargs).arguments)
        except TypeError:
            return None  # the eager call raises it
        return_dict = bool(given.pop("return_dict", True))
        sample = given.pop("sample", None)
        timestep = given.pop("timestep", None)
        text = given.pop("encoder_hidden_states", None)
        added = given.pop("added_cond_kwargs", None) or {}
        if given.pop("cross_attention_kwargs", None) or any(not _empty(v) for v in given.values()):
            return None  # ControlNet residuals, timestep_cond, masks, attention options …
        if (
            not isinstance(sample, torch.Tensor)
            or sample.dim() != 4
            or set(added)
            - {
                "text_embeds",
                "time_ids",
            }
        ):
            return None
        rows = sample.shape[0]
        bucket = next((batch for batch in self.batches if batch >= rows), None)
        if bucket is None:
            return None
        shape = Shape(bucket, sample.shape[3] * self.scale, sample.shape[2] * self.scale)
        planned = self._ready.get(shape)
        if planned is None:
            return None
        timesteps = _timesteps(timestep, rows, sample.device)
        if timesteps is None:
            return None
        batched = {
            "sample": sample,
            "timestep": timesteps,
            "encoder_hidden_states": text,
            "text_embeds": added.get("text_embeds"),
            "time_ids": added.get("time_ids"),
        }
        inputs: Inputs = {}
        for name, value in batched.items():
            if value is None:
                inputs[name] = None
            elif not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != rows:
                return None
            else:
                inputs[name] = _padded(value, bucket)
        if _signature(inputs) != planned:
            log.debug("a %s call differs from the compiled one: eager", shape.label)
            return None
        return inputs, rows, return_dict


def eager_unet(unet: Any) -> contextlib.AbstractContextManager[None]:
    """:meth:`CompiledUnet.eager` when ``unet`` is compiled, else nothing to do."""
    compiled = getattr(unet, "sdswarm_compiled", None)
    return compiled.eager() if isinstance(compiled, CompiledUnet) else contextlib.nullcontext()


def lora_loading(unet: Any) -> None:
    """Before a LoRA is loaded into ``unet``: a compiled one serves eagerly for good."""
    compiled = getattr(unet, "sdswarm_compiled", None)
    if isinstance(compiled, CompiledUnet):
        compiled.lora_loading()


def _reason(what: str, exc: BaseException | None) -> str:
    return what if exc is None else f"{what} ({type(exc).__name__}: {exc})"


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, dict | tuple | list) and not value)


def _timesteps(timestep: Any, rows: int, device: torch.device) -> torch.Tensor | None:
    """``(rows,)`` float32, as the UNet makes of them anyway."""
    if isinstance(timestep, torch.Tensor):
        given: torch.Tensor = timestep
    elif isinstance(timestep, int | float):
        given = torch.tensor([timestep])
    else:
        return None
    if given.numel() == 1:
        return given.reshape(1).to(device, torch.float32).expand(rows)
    if given.shape != (rows,):
        return None
    return given.to(device, torch.float32)


def _padded(value: torch.Tensor, bucket: int) -> torch.Tensor:
    """A fresh contiguous inference tensor of ``bucket`` rows, the last row repeated."""
    extra = bucket - value.shape[0]
    if not extra:
        return value.clone(memory_format=torch.contiguous_format)
    return torch.cat([value, value[-1:].expand(extra, *value.shape[1:])])


def _signature(inputs: Inputs) -> tuple[Any, ...]:
    return tuple(
        (name, None if value is None else (tuple(value.shape), value.dtype, str(value.device)))
        for name, value in inputs.items()
    )


def _output(sample: torch.Tensor, return_dict: bool) -> Any:
    if not return_dict:
        return (sample,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)
