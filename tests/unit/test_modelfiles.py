"""Model files are validated and classified from their header alone."""

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import pytest

from proto import ModelFamily, ModelType
from services.storage.modelfiles import (
    ModelFileError,
    TensorInfo,
    detect_family,
    detect_model_type,
    inspect_checkpoint,
    read_safetensors_header,
)


def _write(path: Path, header: dict[str, object], data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _tensor(shape: list[int], start: int = 0) -> dict[str, object]:
    size = 4
    for d in shape:
        size *= d
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, start + size]}


def test_reads_a_valid_header(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "a.safetensors",
        {"__metadata__": {"format": "pt"}, "w": _tensor([2, 2])},
        b"\0" * 16,
    )
    tensors, metadata = read_safetensors_header(path)
    assert {"w": TensorInfo("F32", (2, 2))} == tensors
    assert {"format": "pt"} == metadata


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"abc", "too short"),
        (struct.pack("<Q", 10**12) + b"{}", "exceeds"),
        (struct.pack("<Q", 100) + b"{}", "truncated"),
        (struct.pack("<Q", 4) + b"\xff\xfe{]", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not an object"),
    ],
)
def test_refuses_broken_files(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=reason):
        read_safetensors_header(path)


def test_refuses_tensors_pointing_outside_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.safetensors", {"w": _tensor([1000])}, b"\0" * 8)
    with pytest.raises(ModelFileError, match="out-of-file"):
        read_safetensors_header(path)


def test_header_limit_is_configurable(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.safetensors", {"w": _tensor([1])}, b"\0" * 4)
    with pytest.raises(ModelFileError, match="limit"):
        read_safetensors_header(path, max_header_bytes=8)


def test_pickles_are_never_parsed(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelFileError, match=r"only \.safetensors"):
        inspect_checkpoint(path)


def _keys(
    text: Mapping[str, tuple[int, ...]], context: int | None, in_channels: int = 4
) -> dict[str, TensorInfo]:
    """A minimal header: conv_in, one cross-attention layer and text-encoder embeddings."""
    tensors = {n: TensorInfo("F16", shape) for n, shape in text.items()}
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = TensorInfo(
        "F16", (320, in_channels, 3, 3)
    )
    if context is not None:
        attn = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        tensors[attn] = TensorInfo("F16", (320, context))
    return tensors


SD1 = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}
SD1_OLD = {"cond_stage_model.transformer.embeddings.token_embedding.weight": (49408, 768)}
SD2 = {"cond_stage_model.model.token_embedding.weight": (49408, 1024)}
XL = {
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (
        49408,
        768,
    ),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
}
XL_REFINER = {"conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)}
TINY_SD1 = {
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 32)
}


@pytest.mark.parametrize(
    ("tensors", "family"),
    [
        (_keys(SD1, 768), ModelFamily.SD1),
        (_keys(SD1_OLD, 768), ModelFamily.SD1),
        (_keys(SD1, 768, in_channels=9), ModelFamily.SD1_INPAINT),
        (_keys(SD2, 1024), ModelFamily.SD2),
        (_keys(SD2, 1024, in_channels=9), ModelFamily.SD2_INPAINT),
        (_keys(XL, 2048), ModelFamily.SDXL),
        (_keys(XL, 2048, in_channels=9), ModelFamily.SDXL_INPAINT),
        # Tiny models: the widths only have to agree with each other.
        (_keys(TINY_SD1, 32), ModelFamily.SD1),
        # UNet-only files: the released cross-attention widths still tell the family.
        (_keys({}, 768), ModelFamily.SD1),
        (_keys({}, 1024), ModelFamily.SD2),
        # Text encoder and UNet disagree: a broken merge no config describes.
        (_keys(SD1, 1024), None),
        (_keys(SD2, 768), None),
        (_keys(XL, 1280), None),
        (_keys(XL_REFINER, 1280), None),  # SDXL refiner: not supported
        (_keys(SD1, 768, in_channels=8), None),  # instruct-pix2pix style: not supported
        (_keys({}, None), None),
        ({"lora_unet_down.weight": TensorInfo("F16", (4, 4))}, None),
    ],
)
def test_family_from_names_and_shapes(
    tensors: dict[str, TensorInfo], family: ModelFamily | None
) -> None:
    assert family == detect_family(tensors)


def _header(tensors: dict[str, TensorInfo]) -> tuple[dict[str, object], int]:
    """A safetensors header for ``tensors`` (1-byte elements, to keep the file small)."""
    header: dict[str, object] = {}
    offset = 0
    for name, info in tensors.items():
        size = 1
        for d in info.shape:
            size *= d
        header[name] = {
            "dtype": "U8",
            "shape": list(info.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    return header, offset


def test_file_name_is_never_used(tmp_path: Path) -> None:
    header, size = _header(_keys(SD1, 768))
    path = _write(tmp_path / "sdxl_base_1.0.safetensors", header, b"\0" * size)
    info = inspect_checkpoint(path)
    assert ModelFamily.SD1 == info.family
    assert (4, False, 768, 3) == (
        info.in_channels,
        info.is_inpaint,
        info.cross_attention_dim,
        info.tensors,
    )


@pytest.mark.parametrize("family", list(ModelFamily))
def test_shipped_config_folders_are_detected_as_their_family(family: ModelFamily) -> None:
    """A shipped config folder is a diffusers folder without weights."""
    folder = Path(__file__).parents[2] / "services" / "inference" / "configs" / family.value
    info = inspect_checkpoint(folder)
    assert family == info.family
    assert info.is_diffusers_folder
    assert info.is_inpaint == family.value.endswith("_inpaint")


def test_diffusers_folder_with_disagreeing_widths_is_unknown(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    for component, config in {
        "unet": {"in_channels": 4, "cross_attention_dim": 1024},
        "text_encoder": {"hidden_size": 768, "hidden_act": "quick_gelu"},
    }.items():
        (folder / component).mkdir(parents=True)
        (folder / component / "config.json").write_text(json.dumps(config))
    (folder / "model_index.json").write_text(
        json.dumps({"text_encoder": ["transformers", "CLIPTextModel"]})
    )
    assert inspect_checkpoint(folder).family is None
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="unreadable"):
        inspect_checkpoint(folder)


# Real layouts: the released models' names and shapes, built on the meta device.


@pytest.fixture(scope="module")
def real_layouts() -> dict[ModelFamily, dict[str, TensorInfo]]:
    pytest.importorskip("torch")
    from tests.fixtures.tiny_model import real_layout

    return {family: real_layout(family) for family in ModelFamily}


@pytest.mark.parametrize("family", list(ModelFamily))
def test_real_layouts_are_detected(
    real_layouts: dict[ModelFamily, dict[str, TensorInfo]], family: ModelFamily
) -> None:
    tensors = real_layouts[family]
    assert 1000 < len(tensors)
    assert family == detect_family(tensors)


def test_real_layout_widths(real_layouts: dict[ModelFamily, dict[str, TensorInfo]]) -> None:
    from services.storage.modelfiles import cross_attention_dim

    widths = {f: cross_attention_dim(t) for f, t in real_layouts.items()}
    assert {"sd1": 768, "sd2": 1024, "sdxl": 2048} == {
        f.value: w for f, w in widths.items() if not f.value.endswith("_inpaint")
    }
    label_emb = real_layouts[ModelFamily.SDXL]["model.diffusion_model.label_emb.0.0.weight"]
    assert (1280, 2816) == label_emb.shape


def test_real_layouts_survive_a_real_header(
    tmp_path: Path, real_layouts: dict[ModelFamily, dict[str, TensorInfo]]
) -> None:
    """The SDXL header (the largest) round-trips through the parser, data left sparse."""
    header, size = _header(real_layouts[ModelFamily.SDXL])
    path = _write(tmp_path / "x.safetensors", header)
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size + size)  # sparse: no disk used
    info = inspect_checkpoint(path)
    assert ModelFamily.SDXL == info.family
    assert len(real_layouts[ModelFamily.SDXL]) == info.tensors


def _infos(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    return {name: TensorInfo("F16", shape) for name, shape in shapes.items()}


_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "stableDiffusion"),
        ({f"{_K}.lora_down.weight": (4, 768), f"{_K}.alpha": ()}, "lora"),
        ({"unet.down.attn2.to_k.lora_A.weight": (4, 2048)}, "lora"),
        ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": (8, 4)}, "lora"),
        (
            {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3)},
            "sdVae",
        ),
        ({"first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3)}, "sdVae"),
        ({"emb_params": (4, 768)}, "embedding"),
        ({"string_to_param.*": (2, 768)}, "embedding"),
        ({"clip_l": (2, 768), "clip_g": (2, 1280)}, "embedding"),
        ({"control_model.input_hint_block.0.weight": (16, 3, 3, 3)}, "controlNet"),
        ({"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3)}, "controlNet"),
        (
            {"conv_first.weight": (64, 3, 3, 3), "RRDB_trunk.0.RDB1.conv1.weight": (32, 64, 3, 3)},
            "upscaler",
        ),
        ({"body.0.weight": (64, 3, 3, 3), "body.1.weight": (64,)}, "upscaler"),
        (
            {
                "toRGB.0.weight": (3, 512, 1, 1),
                "stylegan_decoder.style_mlp.1.weight": (512, 512),
                "conv_body_first.weight": (32, 3, 1, 1),
            },
            "faceRestorer",
        ),
        (
            {
                "quantize.embedding.weight": (1024, 256),
                "quant_conv.weight": (256, 256, 1, 1),
                "encoder.conv_in.weight": (64, 3, 3, 3),
                "decoder.conv_in.weight": (512, 256, 3, 3),
            },
            "faceRestorer",
        ),
        ({"something.else": (2, 2)}, None),
    ],
)
def test_model_type_from_tensor_names(
    shapes: Mapping[str, tuple[int, ...]], expected: str | None
) -> None:
    found = detect_model_type(_infos(shapes))
    assert expected == (found.value if found else None)
    assert found is None or isinstance(found, ModelType)


def _esrgan_new(in_nc: int, upconvs: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "conv_first.weight": (64, in_nc, 3, 3),
        "body.0.rdb1.conv1.weight": (32, 64, 3, 3),
        "conv_body.weight": (64, 64, 3, 3),
        "conv_hr.weight": (64, 64, 3, 3),
        "conv_last.weight": (3, 64, 3, 3),
    }
    for n in range(1, upconvs + 1):
        shapes[f"conv_up{n}.weight"] = (64, 64, 3, 3)
    return shapes


def _esrgan_old(stages: int) -> dict[str, tuple[int, ...]]:
    """``model.0`` conv, ``model.1`` trunk, 3 modules per ×2 stage, HR conv, act, last."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.0.weight": (64, 3, 3, 3),
        "model.1.sub.0.RDB1.conv1.0.weight": (32, 64, 3, 3),
    }
    for n in range(stages):
        shapes[f"model.{3 + 3 * n}.weight"] = (64, 64, 3, 3)
    last = 3 * stages + 4
    shapes[f"model.{last - 2}.weight"] = (64, 64, 3, 3)
    shapes[f"model.{last}.weight"] = (3, 64, 3, 3)
    return shapes


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        (_esrgan_new(3, 2), 4),  # RealESRGAN_x4plus
        (_esrgan_new(12, 2), 2),  # RealESRGAN_x2plus: pixel unshuffle by 2 first
        (_esrgan_new(48, 2), 1),
        (_esrgan_old(2), 4),  # 4x-UltraSharp and other old-layout ESRGAN files
        (_esrgan_old(1), 2),
        (_esrgan_old(3), 8),
        ({"body.0.weight": (64, 3, 3, 3), "body.2.weight": (48, 64, 3, 3)}, 4),  # Compact
        ({"body.0.weight": (64, 3, 3, 3), "body.2.weight": (12, 64, 3, 3)}, 2),
        ({"layers.0.weight": (64, 3, 3, 3)}, None),  # a layout not read here
    ],
)
def test_upscaler_scale_from_shapes(
    shapes: Mapping[str, tuple[int, ...]], expected: int | None
) -> None:
    from services.storage.modelfiles import upscaler_scale

    assert expected == upscaler_scale(_infos(shapes))


def test_lycoris_loha_and_lokr_are_refused_at_registration(tmp_path: Path) -> None:
    from services.storage.scan import inspect_as

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    loha = _write(
        tmp_path / "loha.safetensors",
        {f"{key}.hada_w1_a": _tensor([4, 2]), f"{key}.hada_w1_b": _tensor([2, 4], 32)},
        bytes(64),
    )
    lora = _write(
        tmp_path / "lora.safetensors",
        {f"{key}.lora_down.weight": _tensor([2, 4]), f"{key}.lora_up.weight": _tensor([4, 2], 32)},
        bytes(64),
    )
    refused = inspect_as(loha, ModelType.LORA)
    assert refused.error is not None
    assert "LoHa/LoKr" in refused.error
    assert inspect_as(lora, ModelType.LORA).error is None


# Hostile headers (issue 15, items 7 and 10): each is refused with its reason, and
# nothing but ModelFileError ever leaves the parser (an AttributeError or RecursionError
# used to abort `sdswarm up` and every later scan).
_W = {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}


def _raw(path: Path, raw: bytes, data: bytes = b"\0" * 4) -> Path:
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "reason"),
    [
        ({"__metadata__": "x", "w": _W}, 4, "__metadata__ must be an object"),
        ({"__metadata__": ["a", "b"], "w": _W}, 4, "__metadata__ must be an object"),
        ({"__metadata__": 7, "w": _W}, 4, "__metadata__ must be an object"),
        ({"__metadata__": {"a": 1}, "w": _W}, 4, "value 'a' must be a string"),
        ({"__metadata__": {"a": {"b": "c"}}, "w": _W}, 4, "value 'a' must be a string"),
        ({"w": {**_W, "data_offsets": [0.0, 4.0]}}, 4, "two integers"),
        ({"w": {**_W, "data_offsets": [0, 4.5]}}, 4, "two integers"),
        ({"w": {**_W, "data_offsets": [False, 4]}}, 4, "two integers"),
        ({"w": {**_W, "data_offsets": "04"}}, 4, "two integers"),
        ({"w": {**_W, "data_offsets": [0, 4, 8]}}, 4, "two integers"),
        ({"w": {**_W, "data_offsets": [4, 0]}}, 4, "out-of-file"),
        ({"w": {**_W, "data_offsets": [-4, 0]}}, 4, "out-of-file"),
        ({"w": {**_W, "shape": [4.0]}}, 4, "shape must be"),
        ({"w": {**_W, "shape": [True, 4]}}, 4, "shape must be"),
        ({"w": {**_W, "shape": "4"}}, 4, "shape must be"),
        ({"w": {**_W, "dtype": "Q7"}}, 4, "unknown dtype"),
        ({"w": {**_W, "dtype": ["U8"]}}, 4, "unknown dtype"),
        ({"w": "x"}, 4, "must be an object"),
        ({"w": {**_W, "shape": [2]}}, 4, "span 4 bytes"),
        ({"w": {**_W, "dtype": "F32"}}, 4, "span 4 bytes"),
        ({"w": _W, "v": _W}, 4, "overlaps"),
        ({"w": {**_W, "data_offsets": [4, 8]}}, 8, "leaves a gap"),
        ({"w": _W}, 12, "cover 4 of the 12"),
    ],
)
def test_hostile_headers_are_refused_with_a_reason(
    tmp_path: Path, header: dict[str, object], data: int, reason: str
) -> None:
    path = _raw(tmp_path / "bad.safetensors", json.dumps(header).encode(), b"\0" * data)
    with pytest.raises(ModelFileError, match=reason):
        read_safetensors_header(path)


@pytest.mark.parametrize("depth", [5_000, 200_000])
def test_a_very_deep_header_is_refused(tmp_path: Path, depth: int) -> None:
    raw = b'{"__metadata__": ' + b"[" * depth + b"]" * depth + b"}"
    path = _raw(tmp_path / "deep.safetensors", raw)
    with pytest.raises(ModelFileError):
        read_safetensors_header(path)
    from services.storage.scan import inspect_as

    assert inspect_as(path, ModelType.LORA).error is not None


def test_tensors_in_any_key_order_that_tile_the_data_are_accepted(tmp_path: Path) -> None:
    header = {
        "b": {"dtype": "F16", "shape": [2], "data_offsets": [4, 8]},
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        "empty": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
        "__metadata__": {"format": "pt"},
    }
    path = _raw(tmp_path / "ok.safetensors", json.dumps(header).encode(), b"\0" * 8)
    tensors, metadata = read_safetensors_header(path)
    assert {"a", "b", "empty"} == set(tensors)
    assert {"format": "pt"} == metadata


def test_what_the_parser_accepts_the_safetensors_library_loads(tmp_path: Path) -> None:
    """The same rules as the library: a file that passes here never fails in a worker."""
    from safetensors import safe_open

    header = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}
    path = _raw(tmp_path / "ok.safetensors", json.dumps(header).encode())
    read_safetensors_header(path)
    with safe_open(str(path), "np") as handle:
        assert ["a"] == list(handle.keys())


@pytest.mark.parametrize(
    "index",
    [{"text_encoder": 5}, {"text_encoder": "x"}, {"text_encoder": []}, {"text_encoder": None}],
)
def test_diffusers_folder_with_odd_config_types_is_unknown_not_a_crash(
    tmp_path: Path, index: dict[str, object]
) -> None:
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(
        json.dumps({"in_channels": 4, "cross_attention_dim": "768"})
    )
    (folder / "model_index.json").write_text(json.dumps(index))
    info = inspect_checkpoint(folder)
    assert (None, None) == (info.family, info.cross_attention_dim)
