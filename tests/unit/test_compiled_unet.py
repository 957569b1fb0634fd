"""The compiled UNet's routing (services/inference/compiled.py) with a fake UNet whose output
row i depends on input row i only, and fake compilers: which calls a ready graph serves,
padded up to its bucket and sliced back; which run eagerly; the background compile and its
failures. No inductor here (tests/integration/test_compile_cache.py runs the real one)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from proto.commands import AdapterRef
from proto.workers import CompileState
from services.inference.compiled import CompiledUnet, compile_unet, eager_unet
from services.inference.compileplan import Shape
from services.inference.pipeline import seamless

TEXT = 8
"""The fake's text width (``cross_attention_dim``)."""


class FakeUnet(torch.nn.Module):
    """UNet2DConditionModel's signature; each output row is a function of its input row."""

    def __init__(self, *, xl: bool = False, in_channels: int = 4, record: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(
            in_channels=in_channels,
            cross_attention_dim=TEXT,
            addition_embed_type="text_time" if xl else None,
            addition_time_embed_dim=2,
            projection_class_embeddings_input_dim=5 + 6 * 2,
        )
        self.conv = torch.nn.Conv2d(in_channels, 4, 3, padding=1)
        self.text = torch.nn.Linear(TEXT, 4)
        self.record = record
        self.batches: list[int] = []
        """The batch of every call the module itself ran (when ``record``: a side effect
        dynamo guards on)."""
        self.error: Exception | None = None
        """Raised by every call from now on."""

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        if self.error is not None:
            raise self.error
        if self.record:
            self.batches.append(sample.shape[0])
        steps = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        steps = steps.expand(sample.shape[0])
        out = self.conv(sample) + self.text(encoder_hidden_states.mean(1))[:, :, None, None]
        out = out + steps[:, None, None, None] / 1000
        if added_cond_kwargs:
            added = added_cond_kwargs["text_embeds"].mean(1) + added_cond_kwargs["time_ids"].mean(1)
            out = out + added[:, None, None, None]
        if mid_block_additional_residual is not None:
            out = out + mid_block_additional_residual
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class Compiler:
    """A fake ``torch.compile``: the function itself, with the batches it compiled."""

    def __init__(self, error: Exception | None = None, at_call: Exception | None = None) -> None:
        self.error = error
        self.at_call = at_call
        self.batches: list[int] = []

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if self.error is not None:
            raise self.error

        def compiled(**inputs: Any) -> Any:
            if self.at_call is not None and self.batches:  # compiled fine, then fails
                raise self.at_call
            self.batches.append(inputs["sample"].shape[0])
            return fn(**inputs)

        return compiled


def _compiled(
    unet: FakeUnet, batches: tuple[int, ...] = (2, 4), compiler: Any = None, **options: Any
) -> CompiledUnet:
    shapes = [Shape(batch, 64, 64) for batch in batches]
    compiler = compiler or Compiler()
    return CompiledUnet(unet, device="cpu", shapes=shapes, compiler=compiler, **options)


def _ready(compiled: CompiledUnet) -> CompiledUnet:
    thread = compiled.start()
    assert thread is not None
    thread.join(30)
    return compiled


def _inputs(rows: int, *, side: int = 8, tokens: int = 77) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(rows)
    sample = torch.randn(rows, 4, side, side, generator=generator)
    text = torch.randn(rows, tokens, TEXT, generator=generator)
    return sample, torch.tensor(981), text


def _reference(rows: int, **kwargs: Any) -> torch.Tensor:
    """The call on a plain module: what every routed call has to give."""
    sample, step, text = _inputs(rows)
    with torch.inference_mode():
        out: torch.Tensor = FakeUnet()(sample, step, text, return_dict=False, **kwargs)[0]
    return out


def test_a_batch_is_padded_to_its_bucket_and_sliced_back() -> None:
    unet = FakeUnet()
    compiled = _ready(_compiled(unet))
    sample, step, text = _inputs(3)
    unet.batches.clear()
    with torch.inference_mode():
        out = unet(sample, step, encoder_hidden_states=text, return_dict=False)[0]
    assert [4] == unet.batches, "one call, padded to the bucket of 4"
    assert 1 == compiled.compiled_calls
    assert (3, 4, 8, 8) == tuple(out.shape)
    torch.testing.assert_close(_reference(3), out, rtol=0, atol=1e-6)


def test_the_bucket_is_the_smallest_that_holds_the_batch() -> None:
    unet = FakeUnet()
    compiler = Compiler()
    _ready(_compiled(unet, (2, 4, 8), compiler))
    assert [2, 4, 8] == compiler.batches, "the dummies, in the planned order"
    for rows, bucket in ((1, 2), (2, 2), (3, 4), (5, 8), (8, 8)):
        unet.batches.clear()
        sample, step, text = _inputs(rows)
        unet(sample, step, text)
        assert [bucket] == unet.batches


def test_the_caller_gets_the_form_it_asked_for() -> None:
    unet = FakeUnet()
    _ready(_compiled(unet))
    sample, step, text = _inputs(2)
    as_object = unet(sample, step, encoder_hidden_states=text)
    as_tuple = unet(sample, step, encoder_hidden_states=text, return_dict=False)
    assert isinstance(as_object, UNet2DConditionOutput)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_object.sample, as_tuple[0])


@pytest.mark.parametrize(
    ("rows", "side", "tokens", "kwargs"),
    [
        (2, 16, 77, {}),  # a size not planned
        (6, 8, 77, {}),  # beyond the largest bucket
        (2, 8, 154, {}),  # a prompt past 75 tokens
        (2, 8, 77, {"mid_block_additional_residual": torch.ones(2, 4, 8, 8)}),  # ControlNet
        (2, 8, 77, {"timestep_cond": torch.ones(2, 4)}),
        (2, 8, 77, {"cross_attention_kwargs": {"scale": 0.5}}),
        (2, 8, 77, {"class_labels": torch.zeros(2)}),
    ],
)
def test_calls_no_ready_graph_serves_as_it_is_run_eagerly(
    rows: int, side: int, tokens: int, kwargs: dict[str, Any]
) -> None:
    unet = FakeUnet()
    compiler = Compiler()
    compiled = _ready(_compiled(unet, compiler=compiler))
    sample, step, text = _inputs(rows, side=side, tokens=tokens)
    unet.batches.clear()
    out = unet(sample, step, encoder_hidden_states=text, return_dict=False, **kwargs)[0]
    assert [rows] == unet.batches, "the module ran the call itself, unpadded"
    assert 0 == compiled.compiled_calls
    assert [2, 4] == compiler.batches, "and nothing compiled for it"
    assert (rows, 4, side, side) == tuple(out.shape)


def test_empty_attention_options_are_no_reason_for_eager() -> None:
    unet = FakeUnet()
    compiled = _ready(_compiled(unet))
    sample, step, text = _inputs(2)
    unet(sample, step, text, cross_attention_kwargs={}, added_cond_kwargs=None, timestep_cond=None)
    assert 1 == compiled.compiled_calls


def test_shapes_not_yet_compiled_run_eagerly() -> None:
    unet = FakeUnet()
    compiler = Compiler()
    compiled = _compiled(unet, compiler=compiler)
    sample, step, text = _inputs(2)
    unet(sample, step, text)
    assert [] == compiler.batches
    assert 0 == compiled.compiled_calls
    status = compiled.status()
    assert (CompileState.COMPILING, [], 2) == (status.state, status.ready, status.pending)


def test_the_background_compile_makes_each_shape_ready_in_turn() -> None:
    unet = FakeUnet()
    compiled = _ready(_compiled(unet, (2, 4, 8)))
    status = compiled.status()
    assert CompileState.READY == status.state
    assert ["2@64x64", "4@64x64", "8@64x64"] == status.ready
    assert (0, "") == (status.pending, status.error)
    assert status.seconds >= 0


def test_an_sdxl_call_pads_its_added_conditions_too() -> None:
    unet = FakeUnet(xl=True)
    compiled = _ready(_compiled(unet))
    sample, step, text = _inputs(3)
    added = {"text_embeds": torch.randn(3, 5), "time_ids": torch.randn(3, 6)}
    out = unet(sample, step, text, added_cond_kwargs=added, return_dict=False)[0]
    assert 1 == compiled.compiled_calls
    with torch.inference_mode():
        expected = FakeUnet(xl=True)(sample, step, text, added_cond_kwargs=added).sample
    torch.testing.assert_close(expected, out, rtol=0, atol=1e-6)


def test_an_inpainting_unet_compiles_with_its_nine_channels() -> None:
    unet = FakeUnet(in_channels=9)
    compiled = _ready(_compiled(unet))
    dummy = compiled.dummy_inputs(Shape(2, 64, 64))["sample"]
    assert dummy is not None
    assert 9 == dummy.shape[1]
    sample = torch.randn(2, 9, 8, 8)
    unet(sample, 500, torch.randn(2, 77, TEXT))
    assert 1 == compiled.compiled_calls


def test_a_unet_carrying_lora_layers_runs_eagerly_for_good(caplog: Any) -> None:
    unet = FakeUnet()
    compiled = _ready(_compiled(unet))
    sample, step, text = _inputs(2)
    setattr(unet, "peft_config", {"lora_1": object()})  # noqa: B010 - what PEFT sets
    with caplog.at_level(logging.INFO, logger="services.inference.compiled"):
        unet(sample, step, text)
    del unet.peft_config  # the adapters deleted: their wrappers stay in the modules
    unet(sample, step, text)
    assert 0 == compiled.compiled_calls
    status = compiled.status()
    assert CompileState.OFF == status.state
    assert "a LoRA was applied" in status.error
    assert "a LoRA was applied" in caplog.text


def test_loading_a_lora_through_the_loraset_turns_compile_off_first() -> None:
    from services.inference.lora import LoraError, LoraSet

    unet = FakeUnet()
    compiled = _ready(_compiled(unet))
    loras = LoraSet(SimpleNamespace(unet=unet, delete_adapters=lambda names: None))
    with pytest.raises(LoraError):  # a failed load may leave wrappers behind all the same
        loras.activate([AdapterRef(name="x", path="/nowhere/x.safetensors", sha256="ab")])
    unet(*_inputs(2))
    assert 0 == compiled.compiled_calls
    assert CompileState.OFF == compiled.status().state


def test_a_lora_applied_before_the_background_compile_stops_it() -> None:
    unet = FakeUnet()
    compiler = Compiler()
    compiled = _compiled(unet, compiler=compiler)
    setattr(unet, "peft_config", {})  # noqa: B010 - what PEFT sets
    _ready(compiled)
    assert [] == compiler.batches
    assert CompileState.OFF == compiled.status().state


def test_seamless_tiling_runs_the_unet_eagerly_for_its_duration() -> None:
    unet = FakeUnet()
    compiled = _ready(_compiled(unet))
    pipe = SimpleNamespace(unet=unet, vae=torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3)))
    sample, step, text = _inputs(2)
    with seamless(pipe, enabled=True):
        assert "circular" == str(unet.conv.padding_mode)
        unet(sample, step, text)
        assert 0 == compiled.compiled_calls
    assert "zeros" == unet.conv.padding_mode
    unet(sample, step, text)
    assert 1 == compiled.compiled_calls


def test_an_eager_section_holds_the_background_compile_back() -> None:
    unet = FakeUnet()
    compiler = Compiler()
    compiled = _compiled(unet, compiler=compiler)
    with eager_unet(unet):
        thread = compiled.start()
        assert thread is not None
        thread.join(0.2)
        assert thread.is_alive(), "waiting for the section to end"
        assert [] == compiler.batches
    thread.join(30)
    assert [2, 4] == compiler.batches


def test_a_compile_error_leaves_everything_eager_with_its_reason(caplog: Any) -> None:
    unet = FakeUnet()

    def failing(fn: Callable[..., Any]) -> Callable[..., Any]:
        def compiled(**inputs: Any) -> Any:
            raise RuntimeError("inductor: no C++ compiler here")

        return compiled

    with caplog.at_level(logging.WARNING, logger="services.inference.compiled"):
        compiled = _ready(_compiled(unet, compiler=failing))
    status = compiled.status()
    assert CompileState.FAILED == status.state
    assert "RuntimeError: inductor: no C++ compiler here" in status.error
    assert "compiling the UNet for 2@64x64 failed" in caplog.text
    sample, step, text = _inputs(2)
    torch.testing.assert_close(_reference(2), unet(sample, step, text).sample)
    assert 0 == compiled.compiled_calls


def test_torch_compile_refusing_at_once_leaves_the_unet_as_it_was() -> None:
    unet = FakeUnet()
    forward = unet.forward
    compiled = _compiled(unet, compiler=Compiler(error=RuntimeError("dynamo unsupported")))
    assert forward == unet.forward
    assert not hasattr(unet, "sdswarm_compiled")
    assert None is compiled.start()
    assert "dynamo unsupported" in compiled.status().error


def test_a_compiled_call_that_fails_is_rerun_eagerly_and_compile_stops(caplog: Any) -> None:
    unet = FakeUnet()
    failing = Compiler(at_call=RuntimeError("graph broke"))
    compiled = _ready(_compiled(unet, (2,), compiler=failing))
    assert CompileState.READY == compiled.status().state
    sample, step, text = _inputs(2)
    with caplog.at_level(logging.WARNING, logger="services.inference.compiled"):
        out = unet(sample, step, text).sample
    torch.testing.assert_close(_reference(2), out)
    assert CompileState.FAILED == compiled.status().state
    assert "a compiled UNet call failed (RuntimeError: graph broke)" in caplog.text


def test_a_call_that_fails_eagerly_too_is_the_tasks_error() -> None:
    unet = FakeUnet()
    compiled = _ready(_compiled(unet))
    unet.error = RuntimeError("out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):
        unet(*_inputs(2))
    assert CompileState.READY == compiled.status().state


def test_real_dynamo_compiles_nothing_for_a_call_like_the_dummy() -> None:
    """Dynamo's own guards (shapes, strides, dtypes, grad mode) accept a pipeline-like call
    after the background compile: no graph is compiled on the task's time."""
    from torch._dynamo.utils import counters

    unet = FakeUnet(record=False)
    torch._dynamo.reset()
    compiled = _ready(
        _compiled(unet, compiler=lambda fn: torch.compile(fn, backend="eager", dynamic=False))
    )
    assert CompileState.READY == compiled.status().state
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2
    sample, step, text = _inputs(1)
    with torch.no_grad():  # diffusers' __call__; sdswarm adds inference mode
        latents = torch.cat([sample] * 2)  # classifier-free guidance
        noise = unet(latents, step, encoder_hidden_states=torch.cat([text] * 2), return_dict=False)
    with torch.inference_mode():
        unet(sample[:1].expand(3, -1, -1, -1), 12.5, text.expand(3, -1, -1))
    assert 2 == compiled.compiled_calls
    assert graphs == counters["stats"]["unique_graphs"]
    assert (2, 4, 8, 8) == tuple(noise[0].shape)
    torch._dynamo.reset()


def test_status_waits_for_nothing() -> None:
    """The heartbeat reads the status from the event loop while the compile runs."""
    unet = FakeUnet()
    release = threading.Event()

    def slow(fn: Callable[..., Any]) -> Callable[..., Any]:
        def compiled(**inputs: Any) -> Any:
            release.wait(30)
            return fn(**inputs)

        return compiled

    compiled = _compiled(unet, compiler=slow)
    thread = compiled.start()
    assert CompileState.COMPILING == compiled.status().state
    release.set()
    assert thread is not None
    thread.join(30)
    assert CompileState.READY == compiled.status().state


def _pipe(unet: FakeUnet, prediction_type: str = "epsilon") -> Any:
    scheduler = SimpleNamespace(config={"prediction_type": prediction_type})
    return SimpleNamespace(unet=unet, scheduler=scheduler, vae_scale_factor=8)


def test_the_worker_plans_buckets_and_sizes_and_persists_the_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "restored after the test")
    monkeypatch.setenv("TRITON_CACHE_DIR", "restored after the test")
    unet = FakeUnet()
    compiled = compile_unet(
        _pipe(unet, "v_prediction"),
        device="cpu",
        base="sd2",
        max_batch=3,
        sizes="",
        cache_dir=tmp_path,
        compiler=Compiler(),
    )
    assert compiled is getattr(unet, "sdswarm_compiled")  # noqa: B009 - set at run time
    assert 3 == compiled.status().pending
    _ready(compiled)
    assert ["2@768x768", "4@768x768", "6@768x768"] == compiled.status().ready
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path.resolve() / "compile"))


def test_a_wrong_size_setting_leaves_the_unet_eager_with_the_reason(tmp_path: Path) -> None:
    unet = FakeUnet()
    forward = unet.forward
    compiled = compile_unet(
        _pipe(unet), device="cpu", base="sd1", max_batch=1, sizes="500x512", cache_dir=tmp_path
    )
    assert forward == unet.forward
    status = compiled.status()
    assert CompileState.FAILED == status.state
    assert "compile is off (ValueError: SDSWARM_COMPILE_SIZES: width and height" in status.error
    assert None is compiled.start()


def test_a_wide_size_is_width_by_height() -> None:
    unet = FakeUnet()
    wide = Shape(2, 128, 64)
    compiled = _ready(CompiledUnet(unet, device="cpu", shapes=[wide], compiler=Compiler()))
    dummy = compiled.dummy_inputs(wide)["sample"]
    assert dummy is not None
    assert (2, 4, 8, 16) == tuple(dummy.shape), "latents are (batch, channels, height, width)"
    unet(torch.randn(2, 4, 16, 8), 1, torch.randn(2, 77, TEXT))  # tall: not planned
    assert 0 == compiled.compiled_calls
    unet(torch.randn(2, 4, 8, 16), 1, torch.randn(2, 77, TEXT))
    assert 1 == compiled.compiled_calls
