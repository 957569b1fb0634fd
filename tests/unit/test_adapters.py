"""Resolving the embeddings a prompt names (the model store is faked: a unit boundary)."""

from __future__ import annotations

from typing import Any

import pytest

from proto import ModelType
from services.gateway.adapters import resolve_embeddings


class _Models:
    def __init__(self, documents: list[dict[str, Any]]) -> None:
        self.documents = documents

    async def list_recent(self, model_type: ModelType) -> list[dict[str, Any]]:
        assert ModelType.EMBEDDING == model_type
        return self.documents


class _Resources:
    def __init__(self, documents: list[dict[str, Any]]) -> None:
        self.models = _Models(documents)


def _embedding(name: str, family: str | None, status: str = "unloaded") -> dict[str, Any]:
    return {"name": name, "path": f"/m/{name}.safetensors", "family": family, "status": status}


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("sd1", ["easy-neg", "any-neg"]),
        ("sd1_inpaint", ["easy-neg", "any-neg"]),
        ("sdxl", ["xl-neg", "any-neg"]),
        (None, ["easy-neg", "xl-neg", "any-neg"]),
    ],
)
async def test_embeddings_of_another_family_are_left_out(
    family: str | None, expected: list[str]
) -> None:
    res: Any = _Resources(
        [
            _embedding("easy-neg", "sd1"),
            _embedding("xl-neg", "sdxl"),
            _embedding("any-neg", None),
            _embedding("broken", "sd1", status="failed"),
            _embedding("unused", "sd1"),
        ]
    )
    refs = await resolve_embeddings(res, "a cat, easy-neg", "xl-neg any-neg broken", family=family)
    assert expected == [ref.name for ref in refs]
