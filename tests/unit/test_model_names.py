"""One spelling per model name (issue 15, item 10): NFC, no trailing or doubled
separators; names that only look like another (invisible characters, odd spaces) are
refused with the rule."""

import unicodedata
from pathlib import Path

import pytest

from proto import ModelType
from services.storage.intake import IntakeError, target_path
from services.storage.models import canonical_name, model_document, model_id, name_problem
from services.storage.scan import model_name

NFC = unicodedata.normalize("NFC", "café.safetensors")
NFD = unicodedata.normalize("NFD", "café.safetensors")


def test_nfc_and_nfd_are_different_strings_but_one_name() -> None:
    assert NFC != NFD
    assert NFC == canonical_name(NFD) == canonical_name(NFC)
    assert model_id(ModelType.STABLE_DIFFUSION, NFC) == model_id(ModelType.STABLE_DIFFUSION, NFD)


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("x.safetensors/", "x.safetensors"),
        ("x.safetensors///", "x.safetensors"),
        ("anime//x.safetensors", "anime/x.safetensors"),
        ("ink/", "ink"),
        ("plain.safetensors", "plain.safetensors"),
    ],
)
def test_separators_are_normalised(raw: str, canonical: str) -> None:
    assert canonical == canonical_name(raw)


def test_documents_and_keys_use_the_canonical_name() -> None:
    def document(name: str) -> tuple[str, str, str]:
        doc = model_document(
            name=name, model_type=ModelType.STABLE_DIFFUSION, path="/m", family=None, size_bytes=0
        )
        return doc["_id"], doc["name"], doc["model_key"]

    assert document(NFC) == document(NFD + "/")
    assert NFC == document(NFD)[1]


def test_scanned_files_get_the_canonical_name() -> None:
    assert NFC == model_name(ModelType.STABLE_DIFFUSION, Path(NFD))
    assert "café" == model_name(ModelType.LORA, Path(unicodedata.normalize("NFD", "café.pt")))


@pytest.mark.parametrize(
    ("raw", "relative"),
    [
        ("x.safetensors/", "Stable-diffusion/x.safetensors"),
        (NFD, f"Stable-diffusion/{NFC}"),
        ("anime//x.safetensors", "Stable-diffusion/anime/x.safetensors"),
    ],
)
def test_uploads_land_in_one_file_per_name(tmp_path: Path, raw: str, relative: str) -> None:
    assert tmp_path / relative == target_path(tmp_path, ModelType.STABLE_DIFFUSION, raw, False)


def test_a_lora_name_with_a_trailing_slash_is_its_stem(tmp_path: Path) -> None:
    """It used to become ``Lora/ink/.safetensors``: a hidden file in a new folder."""
    assert tmp_path / "Lora" / "ink.safetensors" == target_path(
        tmp_path, ModelType.LORA, "ink/", False
    )


@pytest.mark.parametrize(
    "name",
    [
        "caf\u200be.safetensors",  # zero-width space
        "caf\u00a0e.safetensors",  # no-break space
        "\u202egnp.safetensors",  # right-to-left override
        "x\ufeff.safetensors",  # byte-order mark
        "x\u3000y.safetensors",  # ideographic space
        "tab\there.safetensors",
    ],
)
def test_look_alike_names_are_refused_naming_the_character(tmp_path: Path, name: str) -> None:
    assert name_problem(name) is not None
    with pytest.raises(IntakeError) as refused:
        target_path(tmp_path, ModelType.STABLE_DIFFUSION, name, False)
    assert (422, "name") == (refused.value.status, refused.value.field)
    assert "U+" in refused.value.message


@pytest.mark.parametrize("name", ["Ünïcode name.safetensors", "模型.safetensors", "a b.ckpt"])
def test_ordinary_unicode_and_spaces_are_fine(name: str) -> None:
    assert name_problem(name) is None
