"""The real loading and diffusers code on the tiny checkpoint, offline, on the CPU."""

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from proto import ModelFamily  # noqa: E402
from services.inference.loader import (  # noqa: E402
    CONFIGS,
    SD1_TEXT,
    SD2_TEXT,
    XL_TEXT_1,
    XL_TEXT_2,
    CheckpointError,
    derive_clip,
    derive_open_clip,
    derive_unet,
    derive_vae,
    load_pipeline,
)
from services.storage.modelfiles import TensorInfo  # noqa: E402
from tests.fixtures.tiny_model import (  # noqa: E402
    TinyModel,
    build_tiny_sd1,
    build_tiny_sdxl,
    real_layout,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def _flush_denormals() -> None:
    # Random tiny weights hit CPU denormals and run 10-50x slower without this.
    torch.set_flush_denormal(True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_sd1(tmp_path_factory.mktemp("tiny-loader"))


@pytest.fixture(autouse=True)
def _no_hub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader must stay offline on its own, not because the environment says so."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # any request fails fast


def _euler(pipe: Any, base: Any = None) -> Any:
    """A1111 "Euler" built from ``base``'s scheduler config (default: the pipeline's own)."""
    from diffusers import EulerDiscreteScheduler

    config = (base or pipe).scheduler.config
    pipe.scheduler = EulerDiscreteScheduler.from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe: Any, seed: int, size: int = 64) -> Any:
    generator = torch.Generator("cpu").manual_seed(seed)
    result = pipe(
        "a photo of a cat", num_inference_steps=2, width=size, height=size, generator=generator
    )
    return np.array(result.images[0])


def test_single_file_round_trip_is_bit_identical(tiny: TinyModel, tmp_path: Path) -> None:
    single = _euler(load_pipeline(tiny.single_file, cache_dir=tmp_path))
    # The same scheduler settings on both sides: the folder saved the fixture's own.
    folder = _euler(load_pipeline(tiny.diffusers_dir, cache_dir=tmp_path), base=single)
    assert torch.float32 == single.unet.dtype
    for component in ("unet", "vae", "text_encoder"):
        a, b = getattr(single, component).state_dict(), getattr(folder, component).state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), component
    first = _image(single, 7)
    assert (64, 64, 3) == first.shape
    assert np.array_equal(first, _image(folder, 7))
    assert np.array_equal(first, _image(single, 7))


def test_tiny_sdxl_single_file_round_trip(tmp_path: Path) -> None:
    """SDXL's path: two encoders (OpenCLIP layout for the second), text_time conditioning."""
    tiny = build_tiny_sdxl(tmp_path / "model")
    single = _euler(load_pipeline(tiny.single_file, cache_dir=tmp_path))
    folder = _euler(load_pipeline(tiny.diffusers_dir, cache_dir=tmp_path), base=single)
    assert "StableDiffusionXLPipeline" == type(single).__name__
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(single, component).state_dict(), getattr(folder, component).state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), component
    assert 0 == single.tokenizer_2.pad_token_id  # OpenCLIP pads with "!"
    first = _image(single, 3)
    assert (64, 64, 3) == first.shape
    assert np.array_equal(first, _image(folder, 3))


def test_the_tokenizer_gives_the_standard_clip_ids(tiny: TinyModel, tmp_path: Path) -> None:
    pipe = load_pipeline(tiny.single_file, cache_dir=tmp_path)
    ids = pipe.tokenizer("a photo of a cat").input_ids
    assert [49406, 320, 1125, 539, 320, 2368, 49407] == ids


def test_family_and_prediction_type_are_per_model_settings(tiny: TinyModel, tmp_path: Path) -> None:
    pipe = load_pipeline(
        tiny.single_file,
        cache_dir=tmp_path,
        family=ModelFamily.SD1,
        prediction_type="v_prediction",
    )
    assert "v_prediction" == pipe.scheduler.config.prediction_type
    assert "PNDMScheduler" == type(pipe.scheduler).__name__  # the rest of the config kept


def test_pickles_are_refused_by_default(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError, match="pickle"):
        load_pipeline(path, cache_dir=tmp_path)


def test_allowed_pickles_load_weights_only(tiny: TinyModel, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(tiny.single_file))
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, ckpt)
    pipe = load_pipeline(ckpt, cache_dir=tmp_path, allow_pickle=True)
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(state[key], pipe.unet.state_dict()["conv_out.weight"])

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(CheckpointError, match=r"refused|not a readable"):
        load_pipeline(evil, cache_dir=tmp_path, allow_pickle=True)


def test_broken_and_foreign_files_fail_with_a_reason(tiny: TinyModel, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny.single_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pipeline(truncated, cache_dir=tmp_path)
    from safetensors.torch import save_file

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(CheckpointError, match="not a Stable Diffusion"):
        load_pipeline(lora, cache_dir=tmp_path)
    other = tmp_path / "model.gguf"
    other.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_pipeline(other, cache_dir=tmp_path)


def test_config_folders_are_built_safely_in_parallel(tiny: TinyModel, tmp_path: Path) -> None:
    """Workers of same-layout checkpoints share one cached config folder."""
    from concurrent.futures import ThreadPoolExecutor

    from services.inference.loader import materialise_config
    from services.storage.modelfiles import detect_family, read_safetensors_header

    tensors, _ = read_safetensors_header(tiny.single_file)
    family = detect_family(tensors)
    assert family is not None
    with ThreadPoolExecutor(6) as pool:
        folders = list(
            pool.map(
                lambda _: materialise_config(tiny.single_file, tensors, family, tmp_path), range(6)
            )
        )
    assert 1 == len(set(folders))
    assert (folders[0] / "model_index.json").is_file()
    assert (folders[0] / "tokenizer" / "tokenizer.json").is_file()
    assert [folders[0]] == [p for p in (tmp_path / "configs").iterdir()]


# For a real checkpoint the derived configs equal the shipped ones: the property that
# lets one loading path serve real files and the tiny test ones.


def _derivations(family: ModelFamily) -> dict[str, Any]:
    def unet(t: dict[str, TensorInfo], c: dict[str, Any]) -> None:
        derive_unet(t, c, family)

    steps: dict[str, Any] = {"unet": unet, "vae": derive_vae}
    if family.value.startswith("sd1"):
        steps["text_encoder"] = lambda t, c: derive_clip(t, SD1_TEXT, c)
    elif family.value.startswith("sd2"):
        steps["text_encoder"] = lambda t, c: derive_open_clip(t, SD2_TEXT, c, penultimate=True)
    else:
        steps["text_encoder"] = lambda t, c: derive_clip(t, XL_TEXT_1, c)
        steps["text_encoder_2"] = lambda t, c: derive_open_clip(t, XL_TEXT_2, c, penultimate=False)
    return steps


@pytest.mark.parametrize("family", list(ModelFamily))
def test_derived_configs_equal_shipped_ones_on_real_layouts(family: ModelFamily) -> None:
    tensors = real_layout(family)
    for component, derive in _derivations(family).items():
        shipped = json.loads((CONFIGS / family.value / component / "config.json").read_text())
        derived = dict(shipped)
        derive(tensors, derived)
        assert shipped == derived, (family, component)
